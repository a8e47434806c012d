"""The layer policy as data: per method and model family, an ordered list of rules (name pattern -> layer spec
fields), first match wins (torchao style). ``quant.api.quantize_`` consumes it, the artifact records it (plain
dicts) and ``build_from_meta`` re-applies the recorded rules.

A rule is ``{"match": glob over module names, "types": [class names] (optional), "set": {fields},
"required": bool (optional)}``. Fields: ``"fp": True`` (not wrapped) or ``quant.layers.LayerSpec`` fields
(``role`` "quant" | "special" (W8A8, frozen), ``w_bits``, ``a_bits``, ``act_quant``, ``act_per_step``,
``act_symmetric``, ``act_scale_method``, ``rounding``, ``lora_rank``, ...) plus ``"split": True`` (shortcut-split
this layer at its structural split point, from the family's ``split_points``). Only Conv1d / Conv2d / Linear
modules are candidates; a candidate no rule matches stays FP. A ``required`` rule must match a layer by its exact
name (it names a family's fixed layers, so a model of another family is refused).

Families: ``compvis_unet`` (ldm UNetModel: cin256-v2, LSUN, SD, digits) and ``ddim_model`` (the DDIM paper's
pixel-space ``Model``, ddim/models/diffusion.py). Each names its reconstruction unit classes (quant.reconstruct).
"""
import fnmatch
from collections import OrderedDict

from torch import nn

from ldm.util import UserError

SPECIAL_LAYERS = ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2")
MATMUL_NAMES = ("qk_matmul", "av_matmul")
CANDIDATES = (nn.Conv1d, nn.Conv2d, nn.Linear)
FAMILIES = {"compvis_unet": "CompVis UNetModel", "ddim_model": "DDIM Model"}

# Reconstruction units per family, by class name (quant.reconstruct.units): BasicTransformerBlock rather than the
# whole SpatialTransformer, as in Q-Diffusion (proj_in / proj_out get layer reconstruction).
UNIT_CLASSES = {"compvis_unet": ("ResBlock", "BasicTransformerBlock", "AttentionBlock"),
                "ddim_model": ("ResnetBlock", "AttnBlock")}


def rule(match, types=(), required=False, **fields):
    """One policy rule as plain data."""
    out = {"match": match, "set": dict(fields)}
    if types:
        out["types"] = list(types)
    if required:
        out["required"] = True
    return out


# MPQ-DM / EfficientDM (MPQ-DM.md §5): four W8A8 layers; ResBlock skip convs, Downsample convs and the legacy
# attention's Conv1d stay FP. The DDIM table is the same choice mapped onto the DDIM model's names [T].
MPQDM_RULES = {
    "compvis_unet": [*(rule(n, required=True, role="special") for n in SPECIAL_LAYERS),
                     rule("*.skip_connection", fp=True), rule("*.op", fp=True),
                     rule("*", types=("Conv1d",), fp=True), rule("*")],
    "ddim_model": [*(rule(n, required=True, role="special") for n in ("temb.dense.0", "temb.dense.1", "conv_in",
                                                                       "conv_out")),
                   rule("*.nin_shortcut", fp=True), rule("*.downsample.conv", fp=True), rule("*")],
}


# ------------------------------------------------------------------------------------------------- families
def model_family(model: nn.Module) -> str:
    """'compvis_unet' or 'ddim_model', from the module structure; a UserError for anything else."""
    names = {n for n, _ in model.named_children()}
    if {"input_blocks", "middle_block", "output_blocks", "time_embed", "out"} <= names:
        return "compvis_unet"
    if {"temb", "conv_in", "down", "mid", "up", "conv_out"} <= names:
        return "ddim_model"
    raise UserError(f"{type(model).__name__} is neither a CompVis UNetModel nor a DDIM Model, so no layer policy "
                    "applies to it.")


def _out_ch(m):
    """Output channels of a conv (wrapped or not) or of a block exposing ``out_channels``."""
    if hasattr(m, "out_channels"):
        return int(m.out_channels)
    return int(m.weight.shape[0])


def _compvis_split_points(unet):
    """Decoder ResBlock i takes cat([h, skip]); its 1x1 skip conv splits at channels(h) = in - channels(skip)."""
    skips = [_out_ch(block[0]) for block in unet.input_blocks]   # conv, ResBlock or Downsample: sets the channels
    h = _out_ch(unet.middle_block[0])
    points = {}
    for i, block in enumerate(unet.output_blocks):
        res = block[0]
        skip = skips.pop()
        if int(res.channels) - skip != h:
            raise ValueError(f"output_blocks.{i}: {res.channels} input channels are not {h} + {skip}")
        conv = res.skip_connection
        if isinstance(conv, CANDIDATES) or hasattr(conv, "weight"):
            points[f"output_blocks.{i}.0.skip_connection"] = h
        h = _out_ch(res)
    return points


def _ddim_split_points(model):
    """Decoder ResnetBlock (level i, block j) takes cat([h, skip]); nin_shortcut splits at in - channels(skip)."""
    skips = [_out_ch(model.conv_in)]
    for level in model.down:
        for block in level.block:
            skips.append(_out_ch(block.conv2))
        if hasattr(level, "downsample"):
            skips.append(skips[-1])
    points = {}
    for i in reversed(range(len(model.up))):
        for j, block in enumerate(model.up[i].block):
            split = int(block.conv1.weight.shape[1]) - skips.pop()
            if getattr(block, "h_channels", None) not in (None, split):
                raise ValueError(f"up.{i}.block.{j}: h_channels {block.h_channels} disagrees with {split}")
            if hasattr(block, "nin_shortcut"):
                points[f"up.{i}.block.{j}.nin_shortcut"] = split
    return points


def split_points(model, family=None):
    """{layer name: input-channel split} of the layers a shortcut-split policy may split, from the structure."""
    family = family or model_family(model)
    return _compvis_split_points(model) if family == "compvis_unet" else _ddim_split_points(model)


# ---------------------------------------------------------------------------------------------- resolution
def _matches(r, name, module):
    types = r.get("types")
    if types and type(module).__name__ not in types:
        return False
    return fnmatch.fnmatchcase(name, r["match"])


def first_rule(rules, name, module):
    """The rule that decides ``module`` (named ``name``): the first that matches, or None."""
    return next((r for r in rules if isinstance(module, CANDIDATES) and _matches(r, name, module)), None)


def resolve(model: nn.Module, rules, family=None):
    """OrderedDict name -> fields of the first matching rule (None: FP) over every candidate layer, in module
    order; ``"split": True`` is replaced by the layer's split index. UserError when a required rule is unmet."""
    modules = dict(model.named_modules())
    out = OrderedDict()
    points = None
    for name, m in modules.items():
        if not name or not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        hit = first_rule(rules, name, m)
        fields = None if hit is None or hit["set"].get("fp") else dict(hit["set"])
        if fields is not None and fields.get("split"):
            points = split_points(model, family) if points is None else points
            if name not in points:
                raise ValueError(f"the policy splits {name!r}, which has no structural split point")
            fields["split"] = points[name]
        elif fields is not None:
            fields.pop("split", None)
        out[name] = fields
    for r in rules:
        if r.get("required") and not any(n == r["match"] and isinstance(modules[n], (nn.Conv2d, nn.Linear))
                                         for n in out):
            raise UserError(f"the UNet has no Conv2d/Linear layer named {r['match']!r}; "
                            f"the layer policy expects a {FAMILIES.get(family, 'CompVis UNetModel')}.")
    return out


def classify(unet: nn.Module, rules=None):
    """OrderedDict name -> role ("special" | "fp" | "quant") under ``rules`` (default: the MPQ-DM table of the
    model's family), over every conv/linear module, in module order."""
    family = model_family(unet)
    resolved = resolve(unet, MPQDM_RULES[family] if rules is None else rules, family)
    return OrderedDict((n, "fp" if f is None else f.get("role", "quant")) for n, f in resolved.items())


def attention_matmuls(unet: nn.Module):
    """Names of the attention matmul submodules (qk_matmul / av_matmul) in module order."""
    return [name for name, _ in unet.named_modules() if name.rsplit(".", 1)[-1] in MATMUL_NAMES]
