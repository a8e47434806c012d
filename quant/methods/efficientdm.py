"""EfficientDM (ICLR 2024) on the shared substrate: b-bit per-channel `max` weight init, no smoothing, one
bit group per layer, shared-B conv LoRA, forward from the stored naive integer weight (MPQ-DM.md §4, §6)."""
from dataclasses import dataclass, replace

import torch

from quant.api import MethodHandler, QuantConfig, register_method
from quant.quantizer import init_max, init_mse, quantize_int


@dataclass(frozen=True)
class EfficientDMConfig(QuantConfig):
    method = "efficientdm"
    conv_lora: str = "shared_b"
    weight_init: str = "max"
    smoothing: bool = False


@register_method("efficientdm")
class EfficientDM(MethodHandler):
    config_class = EfficientDMConfig
    train_weight_zero = False     # EfficientDM trains Δ only

    def layer_spec(self, config, role, n_steps):
        return replace(super().layer_spec(config, role, n_steps), smoothing=False, int_weight=role == "quant")

    @torch.no_grad()
    def init_weights(self, layer, x, config):
        bits = config.w_bits
        w = layer.weight
        init = init_max if config.weight_init == "max" else init_mse
        delta, zero = init(w, bits, per_channel=True)
        wq = layer.weight_quantizer
        wq.bits.fill_(bits)
        wq.delta.copy_(delta)
        wq.zero.copy_(zero)
        # store the naive integer weight; its frozen scale makes deq(W_int) exactly the naive quantized weight
        layer.weight_int.copy_(quantize_int(w, delta.view(wq._view), zero.view(wq._view), 2 ** bits).to(torch.uint8))
        layer.weight_int_delta.copy_(delta)
        layer.weight_int_zero.copy_(torch.round(zero))
        return {"cout": int(w.shape[0]), "bits": {str(bits): int(w.shape[0])}}

