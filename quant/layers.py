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

Post-training layers (Q-Diffusion and its peers, PEERS.md §1) use further LayerSpec fields: one activation set
instead of per-step entries (``act_per_step=False``), a symmetric activation grid, no activation quantizer
(``act_quant=False``), and shortcut splitting (``split`` = c > 0: input channels [c:] get their own activation and
weight quantizers, ``act_quantizer_split`` / ``weight_quantizer_split``, created here from the structure). AdaRound
(quant.adaround) attaches to a weight quantizer during reconstruction and leaves an ordinary grid weight behind.

All quantizer state has fixed shapes from construction; nothing is created lazily in forward, so a state dict
loads into a freshly wrapped model. When no gradient reaches the weight path (sampling, frozen layers) the
quantized weight is computed once and reused until a parameter or buffer on that path changes.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quant.activation import SCALE_METHODS, ActQuantizer, TemporalActQuantizer
from quant.lora import LoRA
from quant.quantizer import fake_quant

ROLES = ("quant", "special")
ROUNDINGS = ("nearest", "adaround")


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
    act_quant: bool = True         # False: the input is not quantized (no activation quantizer at all)
    act_per_step: bool = True      # True: one (Δ, z) per sampling step; False: one set for every step
    act_symmetric: bool = False    # signed activation grid (Q-Diffusion's symmetric option)
    act_scale_method: str = "mse"  # activation init: "mse" | "max"
    split: int = 0                 # shortcut split: input channels [split:] get their own quantizers (0 = none)
    rounding: str = "nearest"      # weight rounding: "nearest" | "adaround" (reconstructed, quant.adaround)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown layer role {self.role!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown weight rounding {self.rounding!r}; expected one of {ROUNDINGS}")
        if self.act_scale_method not in SCALE_METHODS:
            raise ValueError(f"unknown activation scale method {self.act_scale_method!r}")
        if self.split < 0:
            raise ValueError(f"split must be >= 0, got {self.split}")


class WeightQuantizer(nn.Module):
    """Per-output-channel Δ/z Parameters (Cout,) and a per-channel bit-width buffer (Cout,)."""

    def __init__(self, cout, n_bits, weight_dim):
        super().__init__()
        self.delta = nn.Parameter(torch.ones(cout))
        self.zero = nn.Parameter(torch.zeros(cout))
        self.register_buffer("bits", torch.full((cout,), int(n_bits), dtype=torch.int32))
        self._view = (cout,) + (1,) * (weight_dim - 1)
        self.adaround = None      # a quant.adaround.AdaRound while a reconstruction optimises the rounding

    def levels(self):
        return torch.pow(2.0, self.bits.to(self.delta.dtype)).view(self._view)

    def forward(self, w):
        delta, zero = self.delta.view(self._view), self.zero.view(self._view)
        if self.adaround is not None:
            return self.adaround(w, delta, zero, self.levels())
        return fake_quant(w, delta, zero, self.levels())

    def extra_repr(self):
        return f"channels={self.delta.numel()}"


class QuantLayer(nn.Module):
    """Shared machinery of QuantConv2d / QuantLinear; subclasses give the op and the broadcast shapes."""

    def __init__(self, weight, bias, spec: LayerSpec, lora_kind, generator=None):
        super().__init__()
        special = spec.role == "special"
        self.spec = spec
        self.smoothing = spec.smoothing and not special
        self.int_weight = spec.int_weight and not special
        cout, cin = weight.shape[0], weight.shape[1]
        if spec.split and not (0 < spec.split < cin and weight.dim() > 2):
            raise ValueError(f"a split at input channel {spec.split} needs a convolution with more input channels, "
                             f"got weight shape {tuple(weight.shape)}")
        self.split = int(spec.split)
        self.act_enabled = True          # runtime switch (quant_state), not state: weight-only reconstruction
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("smooth", torch.ones(cin, device=weight.device))
        w_bits = 8 if special else spec.w_bits
        self.weight_quantizer = WeightQuantizer(cout, w_bits, weight.dim()).to(weight.device)
        self.act_quantizer = self._make_act_quantizer(spec, special, weight.device)
        if self.split:
            self.weight_quantizer_split = WeightQuantizer(cout, w_bits, weight.dim()).to(weight.device)
            self.act_quantizer_split = self._make_act_quantizer(spec, special, weight.device)
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

    @staticmethod
    def _make_act_quantizer(spec, special, device):
        if special:
            return ActQuantizer(8).to(device)
        if not spec.act_quant:
            return None
        if spec.act_per_step:
            return TemporalActQuantizer(spec.a_bits, spec.n_steps, spec.act_symmetric, spec.act_scale_method).to(device)
        return ActQuantizer(spec.a_bits, spec.act_symmetric, spec.act_scale_method).to(device)

    def weight_quantizers(self):
        """[(weight quantizer, input-channel slice it covers)]: one entry, or two for a split layer."""
        if not self.split:
            return [(self.weight_quantizer, slice(None))]
        return [(self.weight_quantizer, slice(None, self.split)),
                (self.weight_quantizer_split, slice(self.split, None))]

    def act_quantizers(self):
        """The activation quantizers of this layer's input (both halves of a split layer; none when off)."""
        qs = [self.act_quantizer] + ([self.act_quantizer_split] if self.split else [])
        return [q for q in qs if q is not None]

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
        w = self.merged_weight()
        if not self.split:
            return self.weight_quantizer(w)
        return torch.cat([wq(w[:, part]) for wq, part in self.weight_quantizers()], dim=1)

    def _weight_path(self):
        ts = [self.weight, self.smooth]
        for wq, _ in self.weight_quantizers():
            ts += [wq.delta, wq.zero, wq.bits] + ([] if wq.adaround is None else list(wq.adaround.parameters()))
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

    def quantize_input(self, x):
        """Q_a(x) (per half for a split layer); x itself when activation quantization is off or disabled."""
        if self.act_quantizer is None or not self.act_enabled:
            return x
        if not self.split:
            return self.act_quantizer(x)
        return torch.cat([self.act_quantizer(x[:, :self.split]), self.act_quantizer_split(x[:, self.split:])], dim=1)

    def forward(self, x):
        w_hat = self._weight_for_forward()
        x_hat = self.quantize_input(self.smooth_input(x))
        return self._op(x_hat, w_hat)

    def fp_forward(self, x, weight=None):
        """The layer's op with an explicit (default: original FP) weight and no quantization."""
        return self._op(x, self.weight if weight is None else weight)

    def extra_repr(self):
        return (f"role={self.spec.role}, shape={tuple(self.weight.shape)}, smoothing={self.smoothing}"
                + (f", split={self.split}" if self.split else ""))


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


class QuantConv1d(QuantLayer):
    """Conv1d (the legacy AttentionBlock's qkv / proj_out), wrapped by the post-training policies."""

    def __init__(self, conv: nn.Conv1d, spec: LayerSpec, generator=None):
        if spec.lora_rank > 0 or spec.smoothing:
            raise ValueError("Conv1d layers are wrapped without LoRA or smoothing")
        super().__init__(conv.weight, conv.bias, spec, "linear", generator)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError("only zero-padded convolutions can be wrapped")

    @classmethod
    def from_module(cls, m, spec, generator=None):
        return cls(m, spec, generator)

    def _w_smooth_view(self):
        return (1, -1, 1)

    def _x_smooth_view(self, x):
        return (1, -1, 1)

    def _op(self, x, w):
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


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
    inputs, each with its own quantizer (e.g. q·scale and k; softmax probabilities (unsigned) and v). Off by
    default (MPQ-DM keeps attention matmuls FP); ``quant.api`` builds the quantizers the method asks for."""

    def __init__(self, inner: nn.Module, quantizers):
        super().__init__()
        if len(quantizers) != 2:
            raise ValueError("an attention matmul has two inputs, so it needs two quantizers")
        self.inner = inner
        self.input_quantizers = nn.ModuleList(quantizers)
        self.act_enabled = True
        self.register_buffer("calibrated", torch.tensor(False))

    def act_quantizers(self):
        return list(self.input_quantizers)

    def forward(self, a, b, *args, **kwargs):
        if self.act_enabled:
            a, b = self.input_quantizers[0](a), self.input_quantizers[1](b)
        return self.inner(a, b, *args, **kwargs)


@contextlib.contextmanager
def quant_state(model, act=True):
    """Within the block every quantized layer / matmul of ``model`` quantizes its activations iff ``act``
    (weight-only reconstruction runs with act=False); the previous switches are restored on exit."""
    mods = [m for m in model.modules() if isinstance(m, (QuantLayer, QuantMatMul))]
    before = [m.act_enabled for m in mods]
    try:
        for m in mods:
            m.act_enabled = bool(act)
        yield model
    finally:
        for m, was in zip(mods, before):
            m.act_enabled = was


def wrap_layer(m, spec, generator=None):
    if isinstance(m, nn.Conv2d):
        return QuantConv2d.from_module(m, spec, generator)
    if isinstance(m, nn.Conv1d):
        return QuantConv1d.from_module(m, spec, generator)
    if isinstance(m, nn.Linear):
        return QuantLinear.from_module(m, spec, generator)
    raise TypeError(f"cannot quantize {type(m).__name__}")
