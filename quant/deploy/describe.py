"""Graph rules shared by every engine: a quantized layer as plain data, and how it may run in int8.

A layer is a list of input *parts* (today one part over all input channels; a split-input layer of the
post-training peers has two), each with its activation quantizer and the matching slice of the weight:

    y = b + Σ_parts conv(X̂_p, Ŵ_p),  X̂_p = Q_a,p[k](X_p ⊙ 1/s_p),  Ŵ_p = q_p · Δw_p

Rules, each decided here once (measured leads of issue 17):
1. Weights become signed integers q = c − z with zero point 0 and their own per-channel Δ (an asymmetric weight
   zero point makes the CPU plugin fall back to f32). q = round(Ŵ/Δ) of the layer's dequantized weight, so any
   source that ends in an integer grid per channel (naive, fine-tuned with LoRA merged, the packed file,
   AdaRound) is covered, and MPQ-DM's mixed {b−1, b, b+1} channels are just different ranges of q. Fractional
   zero points are snapped to the nearest integer first (as 06 does); ``max_dev`` records what that moved.
2. The 16-bit intermediate sums of the AVX2 u8×s8 kernels (no VNNI/AMX) saturate when 2·a_max·q_max > 32767.
   Such a part is requantized per channel to the largest safe range (``wide="requant"``), kept FP
   (``wide="fp"``), or run as is (``wide="int8"``, right only with VNNI/AMX). On a VNNI/AMX CPU only |q| > 127
   (8-bit weights whose zero point is off-centre) needs requantizing.
3. Activation zero points are snapped to integers too (the code grid of an integer kernel has no fractional
   offset); clipped activations then move by at most |z − round z|·Δ, recorded in ``zero_snap``.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ldm.util import UserError

ACC16_LIMIT = 32767           # the s16 pair sums of vpmaddubsw (AVX2 u8×s8 without VNNI)
WIDE_POLICIES = ("auto", "requant", "fp", "int8")


@dataclass
class ActSpec:
    """One per-tensor asymmetric activation quantizer: codes clamp(round(x/Δ_k) + z_k, 0, 2^bits − 1)."""
    bits: int
    delta: torch.Tensor        # [S] (per-step table) or [1] (single scale), float32
    zero: torch.Tensor         # same shape, integers after snapping
    zero_snap: float = 0.0     # largest |z − round z| before snapping

    @property
    def hi(self):
        return 2 ** self.bits - 1

    @property
    def per_step(self):
        return self.delta.numel() > 1


@dataclass
class WeightSpec:
    """Signed integer weight q (int16 storage until the mode is decided), per-output-channel Δ."""
    q: torch.Tensor
    delta: torch.Tensor        # [Cout] float32
    bits: torch.Tensor         # [Cout] the source's bit width per channel (for the report)
    max_dev: float = 0.0       # max |q·Δ − Ŵ| (zero-point snapping, or a 7-bit requantization)

    @property
    def q_max(self):
        return int(self.q.abs().max()) if self.q.numel() else 0

    def dequantized(self):
        view = (-1,) + (1,) * (self.q.dim() - 1)
        return self.q.to(torch.float32) * self.delta.view(view)


@dataclass
class Part:
    start: int                 # input-channel slice [start, stop)
    stop: int
    act: Optional[ActSpec]     # None: the activation is not quantized (the part runs FP)
    weight: WeightSpec
    smooth_inv: Optional[torch.Tensor] = None   # 1/s over the slice, or None
    mode: str = "int8"         # "int8" | "requant" | "fp"


@dataclass
class LayerExport:
    name: str
    kind: str                  # "conv" | "linear"
    op_args: dict
    bias: Optional[torch.Tensor]
    parts: List[Part] = field(default_factory=list)
    role: str = "quant"

    @property
    def out_channels(self):
        return self.parts[0].weight.q.shape[0]


# --------------------------------------------------------------------------------------------------- ISA
def cpu_int8_isa(cpuinfo="/proc/cpuinfo"):
    """{"vnni": bool, "amx": bool, "flags": [...]} from the CPU flags (Linux); unknown CPUs count as no VNNI."""
    flags = set()
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    found = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"))
    return {"vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "amx": "amx_int8" in flags, "flags": found}


def weight_limit(a_bits, isa):
    """Largest |q| an int8 kernel sums exactly with activation codes up to 2^a_bits − 1 on this ISA."""
    if isa["vnni"] or isa["amx"]:
        return 127
    a_max = 2 ** a_bits - 1
    return min(127, ACC16_LIMIT // (2 * a_max))


# ------------------------------------------------------------------------------------------- extraction
def _act_spec(quantizer):
    if quantizer is None:
        return None
    delta = quantizer.delta.detach().float().reshape(-1).cpu().clone()
    zero = quantizer.zero.detach().float().reshape(-1).cpu()
    snapped = torch.round(zero)
    return ActSpec(int(quantizer.n_bits), delta, snapped,
                   float((zero - snapped).abs().max()) if zero.numel() else 0.0)


@torch.no_grad()
def _weight_spec(w_hat, delta, bits):
    """Signed codes of a per-channel quantized weight Ŵ; Δ from the quantizer. Exact when Ŵ is on the grid."""
    view = (-1,) + (1,) * (w_hat.dim() - 1)
    delta = delta.detach().float().cpu()
    w_hat = w_hat.detach().float().cpu()
    q = torch.round(w_hat / delta.view(view))
    dev = float((q * delta.view(view) - w_hat).abs().max()) if q.numel() else 0.0
    return WeightSpec(q.to(torch.int16), delta.clone(), bits.detach().cpu().to(torch.int32).clone(), dev)


def _op_args(layer, w):
    kind = {4: "conv", 3: "conv1d"}.get(w.dim(), "linear")
    if kind == "linear":
        return kind, {}
    return kind, {"stride": tuple(layer.stride), "padding": tuple(layer.padding),
                  "dilation": tuple(layer.dilation), "groups": int(layer.groups)}


def _slices(layer, cin):
    """Input-channel ranges of the layer's parts: one, or two for a shortcut-split layer."""
    split = int(getattr(layer, "split", 0) or 0)
    return [(0, cin)] if not split else [(0, split), (split, cin)]


def _act_quantizers(layer):
    split = int(getattr(layer, "split", 0) or 0)
    return [getattr(layer, "act_quantizer", None)] + ([getattr(layer, "act_quantizer_split", None)] if split else [])


@torch.no_grad()
def describe_layer(name, layer):
    """LayerExport of a QuantLayer (fake-quant model) or a PackedLayer (06's export); split layers give two
    parts, a layer without an activation quantizer a part that runs FP."""
    from quant.export.packed import PackedLayer
    from quant.layers import QuantLayer

    if isinstance(layer, QuantLayer):
        w = layer.merged_weight().detach()
        quantizers = layer.weight_quantizers() if hasattr(layer, "weight_quantizers") else \
            [(layer.weight_quantizer, slice(None))]
        weights = [_weight_spec(_snapped(wq, w[:, part]), wq.delta, wq.bits) for wq, part in quantizers]
        role = layer.spec.role
    elif isinstance(layer, PackedLayer):
        w_hat = layer.dequantize()
        bits = layer.tags()[0]
        split = int(getattr(layer, "split", 0) or 0)
        ranges = _slices(layer, w_hat.shape[1])
        deltas = [layer.w_delta] + ([layer.w_delta_split] if split else [])
        weights = [_weight_spec(w_hat[:, a:b], d, bits) for (a, b), d in zip(ranges, deltas)]
        role = "quant"
    else:
        raise UserError(f"layer {name!r} is a {type(layer).__name__}, which the engine export does not know; "
                        "describe it in quant/deploy/describe.py.")
    cin = sum(ws.q.shape[1] for ws in weights)
    kind, op_args = _op_args(layer, weights[0].q)
    if op_args.get("groups", 1) != 1 and len(weights) > 1:
        raise UserError(f"layer {name!r} is a grouped convolution with a split input, which the engine export "
                        "does not support.")
    smooth = layer.smooth.detach().float().cpu() if getattr(layer, "smoothing", False) else None
    parts = []
    for (a, b), ws, act in zip(_slices(layer, cin), weights, _act_quantizers(layer)):
        inv = None if smooth is None else 1.0 / smooth[a:b]
        parts.append(Part(a, b, _act_spec(act), ws, inv))
    bias = None if layer.bias is None else layer.bias.detach().float().cpu().clone()
    return LayerExport(name, kind, op_args, bias, parts, role)


def _snapped(wq, w):
    """The weight quantizer's output on w with its zero points rounded (as 06 snaps before packing)."""
    from quant.quantizer import fake_quant
    view = (-1,) + (1,) * (w.dim() - 1)
    return fake_quant(w, wq.delta.detach().view(view), torch.round(wq.zero.detach()).view(view), wq.levels())


def describe_unet(qunet):
    """[LayerExport] for every quantized layer of a QuantUNet (fake-quant or packed), in module order."""
    from quant.export.packed import PackedLayer
    from quant.layers import QuantLayer, QuantMatMul

    if any(isinstance(m, QuantMatMul) for m in qunet.unet.modules()):
        raise UserError("the model quantizes its attention matmuls, which the engine export does not carry yet; "
                        "export a model made without quantize_attention_matmuls.")
    layers = [describe_layer(n, m) for n, m in qunet.unet.named_modules() if isinstance(m, (QuantLayer, PackedLayer))]
    if not layers:
        raise UserError("the model has no quantized layer to deploy.")
    return layers


# ----------------------------------------------------------------------------------------- mode choice
def resolve_wide(wide, isa):
    """The policy for parts whose weights exceed the safe int8 range ("auto": requant without VNNI/AMX,
    int8 with it)."""
    if wide not in WIDE_POLICIES:
        raise UserError(f"the wide-weight policy must be one of {', '.join(WIDE_POLICIES)}, got {wide!r}.")
    if wide == "auto":
        return "int8" if (isa["vnni"] or isa["amx"]) else "requant"
    return wide


@torch.no_grad()
def requantize(weight: WeightSpec, limit):
    """Per-channel symmetric requantization of the channels with |q| > limit onto [−limit, limit]."""
    view = (-1,) + (1,) * (weight.q.dim() - 1)
    q = weight.q.to(torch.float32)
    peak = q.abs().reshape(q.shape[0], -1).amax(1)
    wide = peak > limit
    if not bool(wide.any()):
        return weight
    w_hat = weight.dequantized()
    factor = torch.where(wide, peak / limit, torch.ones_like(peak))
    delta = weight.delta * factor
    q_new = torch.clamp(torch.round(w_hat / delta.view(view)), -limit, limit)
    dev = float((q_new * delta.view(view) - w_hat).abs().max())
    return WeightSpec(q_new.to(torch.int16), delta, weight.bits, max(weight.max_dev, dev))


def decide_modes(layers, wide="auto", isa=None):
    """Set every part's mode in place by rule 2; returns the resolved policy and the ISA used."""
    isa = isa or cpu_int8_isa()
    policy = resolve_wide(wide, isa)
    for layer in layers:
        for part in layer.parts:
            if part.act is None:
                part.mode = "fp"
                continue
            limit = weight_limit(part.act.bits, isa)
            if part.weight.q_max <= limit:
                part.mode = "int8"
            elif policy == "requant" or (policy == "int8" and part.weight.q_max > 127):
                part.weight = requantize(part.weight, limit if policy == "requant" else 127)
                part.mode = "requant"
            elif policy == "fp":
                part.mode = "fp"
            else:
                part.mode = "int8"     # VNNI/AMX, or forced: sums are exact up to |q| = 127
    return policy, isa


def mode_counts(layers):
    counts = {}
    for layer in layers:
        for part in layer.parts:
            counts[part.mode] = counts.get(part.mode, 0) + 1
    return counts
