"""MPQ-DM (AAAI 2025) and MPQ-DM+ on the shared substrate: smoothing, OMQ mixed bits, `mse` weight init,
per-position conv LoRA; TRD options are carried for the fine-tuning loop (MPQ-DM.md §6-8)."""
from collections import Counter
from dataclasses import dataclass

import torch

from ldm.util import UserError
from quant.methods import omq
from quant.api import MethodHandler, QuantConfig, register_method
from quant.quantizer import init_max, init_mse

PLACEHOLDER_DELTA = 0.005   # Δ of the two non-owning quantizers per channel in the released three-group layer


@dataclass(frozen=True)
class MPQDMConfig(QuantConfig):
    method = "mpqdm"
    conv_lora: str = "per_position"
    weight_init: str = "mse"
    smoothing: bool = True
    omq: bool = True                  # ablation: False = every channel at b bits
    omq_candidates: str = "paper"     # "paper" {0..5g} | "released" {0, g}
    trd_mode: str = "paper"           # "paper" | "released" | "off"   (consumed by the fine-tuning loop)
    trd_window: int = 2
    trd_lambda: float = 100.0
    trd_tau: float = 1.0
    trd_cadence: str = "aligned"      # "aligned" | "sliding"

    def weight_bit_groups(self):
        return (self.w_bits - 1, self.w_bits, self.w_bits + 1) if self.omq else (self.w_bits,)

    def __post_init__(self):
        super().__post_init__()
        checks = [(self.omq_candidates in ("paper", "released"), "omq_candidates must be 'paper' or 'released'"),
                  (self.trd_mode in ("paper", "released", "off"), "trd_mode must be 'paper', 'released' or 'off'"),
                  (self.trd_cadence in ("aligned", "sliding"), "trd_cadence must be 'aligned' or 'sliding'"),
                  (isinstance(self.trd_window, int) and self.trd_window >= 1, "trd_window must be an integer >= 1"),
                  (self.trd_tau > 0, "trd_tau must be positive"), (self.trd_lambda >= 0, "trd_lambda must be >= 0")]
        for ok, sentence in checks:
            if not ok:
                raise UserError(sentence + ".")


@dataclass(frozen=True)
class MPQDMPlusConfig(MPQDMConfig):
    method = "mpqdm+"

    def weight_bit_groups(self):
        return (self.w_bits, self.w_bits + 1) if self.omq else (self.w_bits,)


def _bits_log(bits, m):
    cout = bits.numel()
    hist = Counter(int(b) for b in bits.tolist())
    return {"cout": cout, "m": int(m), "m_frac": m / cout, "bits": {str(k): v for k, v in sorted(hist.items())},
            "avg_bits": float(bits.double().mean())}


@register_method("mpqdm")
class MPQDM(MethodHandler):
    config_class = MPQDMConfig

    def choose_bits(self, layer, x, w_s, config):
        """OMQ search (§7.4) -> (bits, m, errors)."""
        b = config.w_bits
        fp_out = layer.fp_forward(x)
        m, bits, errors = omq.search(x, w_s, layer.smooth_input(x), fp_out, layer.fp_forward, b,
                                     omq.candidates(w_s.shape[0], config.omq_candidates))
        return bits, m, errors

    @torch.no_grad()
    def init_weights(self, layer, x, config):
        w_s = layer.merged_weight()
        if config.omq:
            bits, m, errors = self.choose_bits(layer, x, w_s, config)
        else:  # ablation: every channel at b bits
            bits, m, errors = torch.full((w_s.shape[0],), config.w_bits, dtype=torch.int32, device=w_s.device), 0, []
        init = init_mse if config.weight_init == "mse" else init_max
        delta, zero = init(w_s, bits, per_channel=True)
        wq = layer.weight_quantizer
        wq.bits.copy_(bits)
        wq.delta.copy_(delta)
        wq.zero.copy_(zero)
        log = _bits_log(bits, m)
        if errors:
            log["errors"] = errors
        return log

    def lora_lr_delta(self, layer):
        # released layer: three per-channel quantizers, each non-owned channel holding Δ = 0.005, so
        # (ΣΔ_small + ΣΔ_mid + ΣΔ_large)/Cout = mean owning Δ + 2·0.005
        return layer.weight_quantizer.delta.detach().mean().item() + 2 * PLACEHOLDER_DELTA


@register_method("mpqdm+")
class MPQDMPlus(MPQDM):
    config_class = MPQDMPlusConfig

    def choose_bits(self, layer, x, w_s, config):
        return omq.allocate_plus(omq.kurtosis(w_s), config.w_bits), w_s.shape[0] // 10, []
