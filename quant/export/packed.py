"""Truly packed export of a quantized UNet: ONE safetensors file, integer weights at their real bit widths.

File content (tensor keys are exactly the state-dict keys of the QuantUNet that ``load_export`` rebuilds):
- per quantized layer ``unet.<name>.``: ``qweight`` (uint8 dense bit stream, quant.export.packing per-row layout:
  output channel o holds Cin·kh·kw codes of bits[o] bits, rows back to back, LSB first), ``wtags`` (per-channel
  tags packed at 4 bits: bits-1 in bits 0..2, bit 3 = zero point rounded up), ``w_delta``/``w_zero`` (float32
  per channel), ``smooth`` (only for smoothing layers), ``bias``, ``act_quantizer.*`` (per-step or single Δ/z;
  absent when the layer's input is not quantized); a shortcut-split layer (input channels [split:] with their own
  quantizers) also holds ``wtags_split``/``w_delta_split``/``w_zero_split`` and ``act_quantizer_split.*``: its
  rows keep one bit width, so the codes of both halves share the row layout;
- every other tensor of the QuantUNet (FP layers, norms, embeddings, the ``timesteps`` key buffer, attention
  matmul quantizers) as used: float32, or float16 storage upcast at load (``float_dtype="float16"``).
- safetensors metadata: {"format", "format_version", "header"}; header (JSON) holds the method + config, bits,
  timesteps, layer policy, model config hash, per-layer layout + bit histogram + deviation stats, and a sha256
  over all tensor data.

Codes and exactness. The fake quantizer computes x̂ = (clamp(round(x/Δ) + z, 0, hi) - z)·Δ with a float z. We store
c = clamp(round(x/Δ) + ẑ, 0, hi) with an integer ẑ ∈ {floor z, ceil z} chosen per channel, and dequantize as
x̂' = (clamp((c - ẑ) + z, 0, hi) - z)·Δ: the same float operations, so every weight the fake quantizer does not
clip is bitwise identical, and so is every weight when z is integral (naive checkpoints, EfficientDM).
With a fractional z the fake quantizer has 2^b + 1 levels (both clip levels -z·Δ and (hi - z)·Δ are off the
integer grid), which b bits cannot hold; clipped weights on one side then move by |z - ẑ|·Δ (< Δ; ~1e-2·Δ after
fine-tuning at lr 1e-6). ẑ picks the side with the smaller total move; counts go to the header ("deviation").
``snap_zero_points_(qunet)`` sets z := ẑ in the fake model, after which model and export agree bitwise.

API: ``export_quantized(qunet, path, unet_config=None, float_dtype="float32")`` -> header;
``load_export(path, unet_config | fresh UNetModel, dequantize_at_load=False, cache_weights=False)`` -> QuantUNet;
``read_header(path)``, ``theoretical_bytes(path)``, ``snap_zero_points_(qunet)``.
"""
import dataclasses
import hashlib
import json
import os
import struct

import torch
import torch.nn.functional as F
from torch import nn

from ldm.util import UserError, atomic_write_bytes
from quant.api import QuantUNet, config_from_dict, quantize_, set_submodule
from quant.artifacts import config_hash, plain, toolkit_version
from quant.layers import QuantLayer
from quant.export.packing import pack_rows, pack_uint, unpack_rows, unpack_uint

FORMAT = "mpqdm-packed-unet"
FORMAT_VERSION = 1
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
TAG_BITS = 4
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ------------------------------------------------------------------------------------------- packed layer
class PackedLayer(nn.Module):
    """A quantized Conv2d/Linear holding packed integer weights; dequantizes per forward (or once, cached)."""

    def __init__(self, kind, weight_shape, op_args, packed_bytes, smoothing, has_bias, act_quantizer, split=0,
                 act_quantizer_split=None):
        super().__init__()
        cout, cin = weight_shape[0], weight_shape[1]
        self.kind, self.weight_shape, self.op_args, self.smoothing = kind, tuple(weight_shape), dict(op_args), smoothing
        self.split = int(split)
        self.row_len = int(torch.Size(weight_shape[1:]).numel())
        meta = torch.device("meta")
        self.register_buffer("qweight", torch.empty(packed_bytes, dtype=torch.uint8, device=meta))
        self.register_buffer("wtags", torch.empty((cout * TAG_BITS + 7) // 8, dtype=torch.uint8, device=meta))
        self.register_buffer("w_delta", torch.empty(cout, device=meta))
        self.register_buffer("w_zero", torch.empty(cout, device=meta))
        self.register_buffer("smooth", torch.empty(cin, device=meta) if smoothing else None)
        self.register_buffer("bias", torch.empty(cout, device=meta) if has_bias else None)
        if self.split:
            self.register_buffer("wtags_split", torch.empty_like(self.wtags))
            self.register_buffer("w_delta_split", torch.empty(cout, device=meta))
            self.register_buffer("w_zero_split", torch.empty(cout, device=meta))
        self.act_quantizer = act_quantizer
        self.act_quantizer_split = act_quantizer_split
        self.cache_weights = False
        self._weight = None

    @classmethod
    def like(cls, layer: QuantLayer, packed_bytes):
        """Empty (meta) packed twin of a wrapped layer; the act quantizer is reused as built by quantize_."""
        kind = _kind(layer.weight)
        op_args = ({"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                    "groups": layer.groups} if kind != "linear" else {})
        return cls(kind, layer.weight.shape, op_args, packed_bytes, layer.smoothing, layer.bias is not None,
                   layer.act_quantizer, layer.split, getattr(layer, "act_quantizer_split", None))

    def tags(self, suffix=""):
        t = unpack_uint(getattr(self, "wtags" + suffix), TAG_BITS, (self.weight_shape[0],)).to(torch.int64)
        return (t & 7) + 1, (t >> 3) & 1

    @torch.no_grad()
    def dequantize(self):
        """Ŵ from the packed codes: (clamp((c - ẑ) + z, 0, 2^b - 1) - z)·Δ, the fake quantizer's float ops
        (per half, each with its own Δ/z, for a split layer)."""
        bits, _ = self.tags()
        view = (-1,) + (1,) * (len(self.weight_shape) - 1)
        codes = unpack_rows(self.qweight, bits, self.row_len).reshape(self.weight_shape)
        hi = torch.pow(2.0, bits.to(self.w_zero.dtype)).view(view).to(self.w_zero.device) - 1
        parts = [("", slice(None, self.split or None))] + ([("_split", slice(self.split, None))] if self.split else [])
        out = []
        for suffix, part in parts:
            _, up = self.tags(suffix)
            zero, delta = getattr(self, "w_zero" + suffix), getattr(self, "w_delta" + suffix)
            z, d = zero.view(view), delta.view(view)
            z_int = (torch.floor(zero) + up.to(zero)).view(view)
            v = codes[:, part].to(device=z.device, dtype=z.dtype).sub_(z_int).add_(z)
            out.append(torch.clamp(v, min=torch.zeros((), dtype=v.dtype, device=v.device), max=hi).sub_(z).mul_(d))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def weight_for_forward(self):
        if self._weight is not None:
            return self._weight
        w = self.dequantize()
        if self.cache_weights:
            self._weight = w
        return w

    def forward(self, x):
        w = self.weight_for_forward()
        if self.smoothing:
            view = {"conv": (1, -1, 1, 1), "conv1d": (1, -1, 1)}.get(self.kind, (-1,))
            x = x * (1.0 / self.smooth).view(view)
        if self.act_quantizer is not None:
            x = (torch.cat([self.act_quantizer(x[:, :self.split]), self.act_quantizer_split(x[:, self.split:])], 1)
                 if self.split else self.act_quantizer(x))
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        a = self.op_args
        op = F.conv2d if self.kind == "conv" else F.conv1d
        return op(x, w, self.bias, a["stride"], a["padding"], a["dilation"], a["groups"])

    def extra_repr(self):
        return f"{self.kind}, shape={self.weight_shape}, packed_bytes={self.qweight.numel()}"


# ------------------------------------------------------------------------------------------------ export
def _kind(weight):
    return {4: "conv", 3: "conv1d"}.get(weight.dim(), "linear")


@torch.no_grad()
def pack_layer(layer: QuantLayer):
    """Codes, tags and deviation stats of one wrapped layer: ({suffix: tensor}, layout dict)."""
    w = layer.merged_weight().detach()
    cout = w.shape[0]
    view = (cout,) + (1,) * (w.dim() - 1)
    wq = layer.weight_quantizer
    bits = wq.bits.detach().to(torch.int64).cpu()
    hi = wq.levels().detach() - 1
    codes, deq, tensors = [], [], {}
    for (q, part), suffix in zip(layer.weight_quantizers(), ("", "_split")):
        if not torch.equal(q.bits, wq.bits):
            raise ValueError("both halves of a split layer must use the same per-channel bit widths")
        delta, z = q.delta.detach().view(view), q.zero.detach().view(view)
        r, up, z_int = _zero_choice(w[:, part], delta, z, hi)
        c = torch.clamp(r + z_int, min=torch.zeros((), dtype=w.dtype, device=w.device), max=hi)
        codes.append(c)
        # The decode below is what PackedLayer.dequantize computes; compared with the fake-quant weight.
        deq.append(torch.clamp(c - z_int + z, min=torch.zeros((), dtype=w.dtype, device=w.device), max=hi)
                   .sub_(z).mul_(delta))
        tensors.update({"wtags" + suffix: pack_uint((bits - 1) | (up.cpu() << 3), TAG_BITS),
                        "w_delta" + suffix: q.delta.detach().float().cpu().clone(),
                        "w_zero" + suffix: q.zero.detach().float().cpu().clone()})
    codes, deq = torch.cat(codes, dim=1), torch.cat(deq, dim=1)
    fake = layer.quantized_weight().detach()
    diff = (deq - fake).abs()
    tensors["qweight"] = pack_rows(codes.to(torch.uint8).cpu().reshape(cout, -1), bits)
    if layer.smoothing:
        tensors["smooth"] = layer.smooth.detach().cpu().clone()
    hist = torch.bincount(bits, minlength=9)
    layout = {"role": layer.spec.role, "kind": _kind(w), "shape": list(w.shape),
              "row_len": int(w[0].numel()), "packed_bytes": tensors["qweight"].numel(),
              "bits": {str(b): int(n) for b, n in enumerate(hist.tolist()) if n},
              "total_bits": int((bits * w[0].numel()).sum()), "smoothing": bool(layer.smoothing),
              "split": int(layer.split),
              "deviation": {"count": int((diff > 0).sum()), "max_abs": float(diff.max()) if diff.numel() else 0.0}}
    return tensors, layout


@torch.no_grad()
def snap_zero_points_(qunet: QuantUNet):
    """Round every weight zero point z to the nearest integer (in place); afterwards the fake-quantized model and
    its packed export agree bitwise. Returns the largest change of any quantized weight.

    With an integer zero point every clipped weight moves by |z − round(z)|·Δ and no other weight moves, so the
    nearest integer is the best choice here. (_zero_choice, which may pick the other neighbour, is for exporting
    a float-z model as is: its decode keeps the float z in the clamp, so only one clip side moves.)"""
    largest = 0.0
    for _, layer in qunet.quant_layers():
        before = layer.quantized_weight().detach()
        for wq, _ in layer.weight_quantizers():
            wq.zero.copy_(torch.round(wq.zero))
        layer.clear_cache()
        largest = max(largest, float((layer.quantized_weight().detach() - before).abs().max()))
    return largest


def _zero_choice(w, delta, z, hi):
    """(r = round(w/Δ), up flag per channel, ẑ viewed like z): ẑ = floor(z) moves only the weights the fake
    quantizer clips below, ceil(z) only those clipped above; take the side with the smaller total move."""
    cout = w.shape[0]
    r = torch.round(w / delta)
    v = r + z
    frac = (z - torch.floor(z)).reshape(cout)
    below = (v < 0).reshape(cout, -1).sum(1)
    above = (v > hi).reshape(cout, -1).sum(1)
    up = ((frac > 0) & (above * (1 - frac) < below * frac)).to(torch.int64)
    return r, up, (torch.floor(z).reshape(cout) + up).view(z.shape)


def _digest(tensors) -> str:
    """sha256 over every tensor's bytes in key order (catches corruption the container format cannot)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def normalize_unet_config(config):
    """{target, params} mapping for a UNet config given as such, as a bare params mapping, or as OmegaConf."""
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(config):
            config = OmegaConf.to_container(config, resolve=True)
    except ImportError:
        pass
    config = plain(dict(config))
    if "target" in config:
        return {"target": config["target"], "params": config.get("params", {})}
    return {"target": UNET_TARGET, "params": config}


@torch.no_grad()
def export_quantized(qunet: QuantUNet, path, unet_config=None, float_dtype="float32", extra_meta=None):
    """Write the packed file (atomically); returns the header dict. ``unet_config``: the UNet's config (its
    hash is recorded and checked at load); ``float_dtype``: storage of the unquantized tensors."""
    if float_dtype not in _FLOAT_DTYPES:
        raise UserError(f"float_dtype must be 'float32' or 'float16', got {float_dtype!r}.")
    layers = qunet.quant_layers()
    prefixes = tuple(f"unet.{n}." for n, _ in layers)
    tensors, layouts = {}, {}
    for key, t in qunet.state_dict().items():
        if key.startswith(prefixes):
            continue
        t = t.detach().cpu()
        if t.is_floating_point() and "quantizer" not in key:
            t = t.to(_FLOAT_DTYPES[float_dtype])
        tensors[key] = t.contiguous().clone()
    for name, layer in layers:
        packed, layouts[name] = pack_layer(layer)
        if layer.bias is not None:
            packed["bias"] = layer.bias.detach().cpu().to(_FLOAT_DTYPES[float_dtype])
        for attr in ("act_quantizer", "act_quantizer_split"):
            act = getattr(layer, attr, None)
            for k, v in ({} if act is None else act.state_dict()).items():
                packed[f"{attr}.{k}"] = v.detach().cpu().clone()
        tensors.update({f"unet.{name}.{k}": v.contiguous() for k, v in packed.items()})
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "toolkit_version": toolkit_version(),
        **qunet.meta(),
        "model_config_hash": None if unet_config is None else config_hash(normalize_unet_config(unet_config)),
        "layer_policy": dict(classify_names(qunet)),
        "layers": layouts, "float_dtype": float_dtype, "tag_bits": TAG_BITS,
        "packing": "rows back to back, per-row bit width, LSB-first dense bit stream (quant.export.packing)",
        "sha256": _digest(tensors),
        "extra": plain(extra_meta or {}),
    }
    from safetensors.torch import save
    data = save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                   "header": json.dumps(header, separators=(",", ":"))})
    atomic_write_bytes(path, data)
    return header


def classify_names(qunet):
    """Layer policy of the wrapped UNet: name -> quant | special | fp (wrapped layers report their role)."""
    roles = {}
    for name, m in qunet.unet.named_modules():
        if isinstance(m, QuantLayer):
            roles[name] = m.spec.role
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            roles[name] = "fp"
    return roles


def theoretical_bytes(path):
    """Σ bits/8 per quantized weight + every stored float tensor (Δ, z, s, biases, act Δ/z, FP tensors) at its
    stored dtype: the information content, without container overhead, bit-width tags or byte padding."""
    header, index = read_header(path), tensor_index(path)
    total = sum(l["total_bits"] for l in header["layers"].values()) / 8
    return total + sum(end - start for key, (start, end) in index.items() if not key.endswith((".qweight", ".wtags")))


def tensor_index(path):
    """{key: (start, end)} byte ranges of the tensors, from the safetensors index (no tensor is read)."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        index = json.loads(fh.read(n))
    return {k: tuple(v["data_offsets"]) for k, v in index.items() if k != "__metadata__"}


# -------------------------------------------------------------------------------------------------- load
def read_header(path):
    """The JSON header of a packed export (no tensor is read); UserError when the file is not one."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"The packed export {path} does not exist.")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:
        raise UserError(f"The packed export {path} is truncated or not a safetensors file ({type(err).__name__}).") \
            from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a packed UNet export written by this toolkit.")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise UserError(f"{path} has export format version {meta.get('format_version')}, "
                        f"this toolkit reads version {FORMAT_VERSION}.")
    try:
        return json.loads(meta["header"])
    except (KeyError, ValueError):
        raise UserError(f"The header of the packed export {path} is corrupt.") from None


def _build_unet(model, header):
    if isinstance(model, nn.Module):
        return model
    config = normalize_unet_config(model)
    want = header.get("model_config_hash")
    if want is not None and config_hash(config) != want:
        raise UserError(f"The packed export was made for a model config with hash {want}, "
                        f"but the given config hashes to {config_hash(config)}.")
    from ldm.util import get_obj_from_str
    with torch.device("meta"):
        return get_obj_from_str(config["target"])(**config["params"])


@torch.no_grad()
def load_export(path, model, dequantize_at_load=False, cache_weights=False, verify=True, device="cpu"):
    """Rebuild the quantized UNet from a packed file and a UNet config (or a freshly built UNet).

    Quantized layers become PackedLayer modules holding the packed integers; they dequantize in forward
    (``cache_weights`` keeps the result after the first call; ``dequantize_at_load`` does it now).
    ``verify`` checks every tensor's checksum. Any disagreement with the model is a UserError.
    """
    header = read_header(path)
    unet = _build_unet(model, header)
    qconfig = dataclasses.replace(config_from_dict(header["config"]), lora_rank=0)  # LoRA is merged
    qunet = quantize_(unet, qconfig, header["timesteps"], header.get("policy"))
    layers = dict(qunet.quant_layers())
    want = header["layers"]
    for name in list(layers) + list(want):
        if name not in layers or name not in want:
            where = "the model" if name not in layers else "the file"
            raise UserError(f"Quantized layer {name!r} is missing from {where}; the export belongs to another model.")
        if list(layers[name].weight.shape) != want[name]["shape"]:
            raise UserError(f"Layer {name!r} has shape {list(layers[name].weight.shape)} in the model but "
                            f"{want[name]['shape']} in the packed export.")
    for name, layer in layers.items():
        set_submodule(qunet.unet, name, PackedLayer.like(layer, want[name]["packed_bytes"]))
    tensors = _read_tensors(path, header, verify)
    expected = qunet.state_dict()
    for key in list(expected) + list(tensors):
        if key not in expected or key not in tensors:
            where = "the model" if key not in expected else "the file"
            raise UserError(f"Tensor {key!r} is missing from {where}; the export belongs to another model.")
        if tuple(expected[key].shape) != tuple(tensors[key].shape):
            raise UserError(f"Tensor {key!r} has shape {tuple(tensors[key].shape)} in the packed export but "
                            f"{tuple(expected[key].shape)} in the model.")
        if tensors[key].dtype == torch.float16 and expected[key].dtype == torch.float32:
            tensors[key] = tensors[key].float()
    qunet.load_state_dict(tensors, strict=True, assign=True)
    qunet.to(device)
    stray = [n for n, t in list(qunet.named_parameters()) + list(qunet.named_buffers()) if t.is_meta]
    if stray:
        raise UserError(f"The packed export has no value for {stray[0]!r}.")
    qunet.export_header = header
    for m in qunet.modules():
        if isinstance(m, PackedLayer):
            m.cache_weights = cache_weights or dequantize_at_load
            if dequantize_at_load:
                m.weight_for_forward()
    return qunet.eval().requires_grad_(False)


def _read_tensors(path, header, verify):
    from safetensors import safe_open
    out = {}
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    except Exception as err:
        raise UserError(f"The packed export {path} is truncated or corrupt ({type(err).__name__}).") from None
    if verify and header.get("sha256") != _digest(out):
        raise UserError(f"The packed export {path} is corrupt: its tensors fail the header's sha256 checksum.")
    return out
