"""Quantized Conv2d / Linear with smoothing, per-channel mixed weight bits and LoRA (MPQ-DM.md §4).

Forward, for role "quant":
    W' = W + ΔW                       (LoRA merged before quantization)
    Ŵ  = fake_quant(W'·s, Δ, z, 2^bits)   one pass; bits is a per-output-channel int buffer, so the three OMQ
                                       groups {b-1, b, b+1} are just different per-channel levels/Δ/z
    X̂  = Q_a[k](X ⊙ 1/s)              temporal per-tensor quantizer, k from quant.step
    y  = conv/linear(X̂, Ŵ, bias)
Role "special" (W8A8): 8-bit per-channel weight, one per-tensor 8-bit activation scale, no smoothing/LoRA, frozen.

EfficientDM layers (spec.int_weight): after calibration the naive b-bit integer weight is stored as a uint8
buffer ``weight_int`` with its frozen calibration scale ``weight_int_delta``/``weight_int_zero``; the forward
uses deq(W_int) = (W_int - z0)·Δ0 in place of W, so Ŵ = Q(deq(W_int) + ΔW) with the same trainable quantizer.
The FP ``weight`` stays in the state dict (original checkpoint value) but no longer feeds the forward.

All quantizer state has fixed shapes from construction; nothing is created lazily in forward, so a state dict
loads into a freshly wrapped model. When no gradient reaches the weight path (sampling, frozen layers) the
quantized weight is computed once and reused until a parameter or buffer on that path changes.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quant.activation import ActQuantizer, TemporalActQuantizer
from quant.lora import LoRA
from quant.quantizer import fake_quant

ROLES = ("quant", "special")


@dataclass(frozen=True)
class LayerSpec:
    role: str = "quant"            # "quant" | "special"
    w_bits: int = 4                # initial per-channel bits (OMQ rewrites the buffer during calibration)
    a_bits: int = 8
    n_steps: int = 1               # entries of the temporal activation quantizer
    lora_rank: int = 32            # 0 = no LoRA
    conv_lora: str = "per_position"
    smoothing: bool = False
    int_weight: bool = False       # EfficientDM: forward from the stored naive integer weight


class WeightQuantizer(nn.Module):
    """Per-output-channel Δ/z Parameters (Cout,) and a per-channel bit-width buffer (Cout,)."""

    def __init__(self, cout, n_bits, weight_dim):
        super().__init__()
        self.delta = nn.Parameter(torch.ones(cout))
        self.zero = nn.Parameter(torch.zeros(cout))
        self.register_buffer("bits", torch.full((cout,), int(n_bits), dtype=torch.int32))
        self._view = (cout,) + (1,) * (weight_dim - 1)

    def levels(self):
        return torch.pow(2.0, self.bits.to(self.delta.dtype)).view(self._view)

    def forward(self, w):
        return fake_quant(w, self.delta.view(self._view), self.zero.view(self._view), self.levels())

    def extra_repr(self):
        return f"channels={self.delta.numel()}"


class QuantLayer(nn.Module):
    """Shared machinery of QuantConv2d / QuantLinear; subclasses give the op and the broadcast shapes."""

    def __init__(self, weight, bias, spec: LayerSpec, lora_kind, generator=None):
        super().__init__()
        if spec.role not in ROLES:
            raise ValueError(f"unknown layer role {spec.role!r}")
        special = spec.role == "special"
        self.spec = spec
        self.smoothing = spec.smoothing and not special
        self.int_weight = spec.int_weight and not special
        cout, cin = weight.shape[0], weight.shape[1]
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("smooth", torch.ones(cin, device=weight.device))
        self.weight_quantizer = WeightQuantizer(cout, 8 if special else spec.w_bits, weight.dim()).to(weight.device)
        if special:
            self.act_quantizer = ActQuantizer(8).to(weight.device)
        else:
            self.act_quantizer = TemporalActQuantizer(spec.a_bits, spec.n_steps).to(weight.device)
        self.lora = None
        if spec.lora_rank > 0 and not special:
            with torch.device(weight.device):
                self.lora = LoRA(weight.shape, spec.lora_rank, lora_kind, generator=generator)
        if self.int_weight:
            self.register_buffer("weight_int", torch.zeros(weight.shape, dtype=torch.uint8, device=weight.device))
            self.register_buffer("weight_int_delta", torch.ones(cout, device=weight.device))
            self.register_buffer("weight_int_zero", torch.zeros(cout, device=weight.device))
        self.register_buffer("calibrated", torch.tensor(False, device=weight.device))
        if special:
            self.requires_grad_(False)
        self._cache_key, self._cache = None, None

    # -- broadcast shapes -------------------------------------------------------------------------------
    def _w_smooth_view(self):
        return (1, -1) + (1,) * (self.weight.dim() - 2)

    def _x_smooth_view(self, x):
        raise NotImplementedError

    def _op(self, x, w):
        raise NotImplementedError

    # -- weight path ------------------------------------------------------------------------------------
    def base_weight(self):
        """W, or deq(W_int) for EfficientDM layers."""
        if self.int_weight:
            view = self.weight_quantizer._view
            return (self.weight_int.to(self.weight.dtype) - self.weight_int_zero.view(view)) * \
                self.weight_int_delta.view(view)
        return self.weight

    def merged_weight(self):
        """W'·s: LoRA merged, smoothing applied, not yet quantized (the tensor the weight quantizer sees)."""
        w = self.base_weight()
        if self.lora is not None:
            w = w + self.lora.delta_weight()
        if self.smoothing:
            w = w * self.smooth.view(self._w_smooth_view())
        return w

    def quantized_weight(self):
        return self.weight_quantizer(self.merged_weight())

    def _weight_path(self):
        ts = [self.weight, self.smooth, self.weight_quantizer.delta, self.weight_quantizer.zero,
              self.weight_quantizer.bits]
        if self.lora is not None:
            ts += [self.lora.lora_A, self.lora.lora_B]
        if self.int_weight:
            ts += [self.weight_int, self.weight_int_delta, self.weight_int_zero]
        return ts

    def _weight_for_forward(self):
        ts = self._weight_path()
        if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
            self._cache_key = self._cache = None
            return self.quantized_weight()
        key = tuple((t.data_ptr(), t._version, t.device) for t in ts)
        if key != self._cache_key:
            with torch.no_grad():
                self._cache = self.quantized_weight()
            self._cache_key = key
        return self._cache

    def clear_cache(self):
        self._cache_key = self._cache = None

    # -- forward --------------------------------------------------------------------------------------
    def smooth_input(self, x):
        if self.smoothing:
            x = x * (1.0 / self.smooth).view(self._x_smooth_view(x))
        return x

    def forward(self, x):
        w_hat = self._weight_for_forward()
        x_hat = self.act_quantizer(self.smooth_input(x))
        return self._op(x_hat, w_hat)

    def fp_forward(self, x, weight=None):
        """The layer's op with an explicit (default: original FP) weight and no quantization."""
        return self._op(x, self.weight if weight is None else weight)

    def extra_repr(self):
        return f"role={self.spec.role}, shape={tuple(self.weight.shape)}, smoothing={self.smoothing}"


class QuantConv2d(QuantLayer):
    def __init__(self, conv: nn.Conv2d, spec: LayerSpec, generator=None):
        super().__init__(conv.weight, conv.bias, spec, spec.conv_lora, generator)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError("only zero-padded convolutions can be wrapped")

    @classmethod
    def from_module(cls, m, spec, generator=None):
        return cls(m, spec, generator)

    def _x_smooth_view(self, x):
        return (1, -1, 1, 1)

    def _op(self, x, w):
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(QuantLayer):
    def __init__(self, linear: nn.Linear, spec: LayerSpec, generator=None):
        super().__init__(linear.weight, linear.bias, spec, "linear", generator)

    @classmethod
    def from_module(cls, m, spec, generator=None):
        return cls(m, spec, generator)

    def _x_smooth_view(self, x):
        return (-1,)

    def _op(self, x, w):
        return F.linear(x, w, self.bias)


class QuantMatMul(nn.Module):
    """Wraps a parameter-free attention matmul module (qk_matmul / av_matmul) and quantizes its two tensor
    inputs with temporal per-tensor quantizers. Off by default (MPQ-DM keeps attention matmuls FP)."""

    def __init__(self, inner: nn.Module, a_bits, n_steps):
        super().__init__()
        self.inner = inner
        self.input_quantizers = nn.ModuleList([TemporalActQuantizer(a_bits, n_steps) for _ in range(2)])
        self.register_buffer("calibrated", torch.tensor(False))

    def forward(self, a, b, *args, **kwargs):
        return self.inner(self.input_quantizers[0](a), self.input_quantizers[1](b), *args, **kwargs)


def wrap_layer(m, spec, generator=None):
    if isinstance(m, nn.Conv2d):
        return QuantConv2d.from_module(m, spec, generator)
    if isinstance(m, nn.Linear):
        return QuantLinear.from_module(m, spec, generator)
    raise TypeError(f"cannot quantize {type(m).__name__}")
