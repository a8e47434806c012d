"""Which UNet layers are quantized, kept FP, or W8A8 "special" (MPQ-DM.md §5), decided by module role.

Roles: "special" (the four W8A8 layers, found by name), "fp" (ResBlock skip_connection convs, Downsample.op
convs, every Conv1d of the legacy AttentionBlock), "quant" (every other nn.Conv2d / nn.Linear). Attention
matmuls (the parameter-free ``qk_matmul`` / ``av_matmul`` submodules) are listed separately; they stay FP
unless the config asks for them to be quantized.
"""
from collections import OrderedDict

from torch import nn

from ldm.util import UserError

SPECIAL_LAYERS = ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2")
_FP_CHILDREN = {("ResBlock", "skip_connection"), ("Downsample", "op")}
MATMUL_NAMES = ("qk_matmul", "av_matmul")


def _parent_class(modules, name):
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return type(modules[parent]).__name__


def classify(unet: nn.Module):
    """OrderedDict name -> role over every conv/linear module of the UNet, in module order."""
    modules = dict(unet.named_modules())
    roles = OrderedDict()
    for name, m in modules.items():
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        child = name.rsplit(".", 1)[-1]
        if name in SPECIAL_LAYERS:
            roles[name] = "special"
        elif not isinstance(m, (nn.Conv2d, nn.Linear)):
            roles[name] = "fp"
        elif (_parent_class(modules, name), child) in _FP_CHILDREN:
            roles[name] = "fp"
        else:
            roles[name] = "quant"
    missing = [n for n in SPECIAL_LAYERS if roles.get(n) != "special" or
               not isinstance(modules[n], (nn.Conv2d, nn.Linear))]
    if missing:
        raise UserError(f"the UNet has no Conv2d/Linear layer named {missing[0]!r}; "
                        "the layer policy expects a CompVis UNetModel.")
    return roles


def attention_matmuls(unet: nn.Module):
    """Names of the attention matmul submodules (qk_matmul / av_matmul) in module order."""
    return [name for name, _ in unet.named_modules() if name.rsplit(".", 1)[-1] in MATMUL_NAMES]

