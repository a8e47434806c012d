"""The element-wise side of the engine graph: the layout element-wise chains run in, and the UNet rewrites for it.

Rule 5 of the engine graph (OpenVINO 2026.4, AVX-512 CPU, one thread; benchmarks/elementwise_layout.py): the CPU
plugin's element-wise kernels run 4-10x slower on a tensor whose last dimension is shorter than the 16-float vector.
SiLU on [200, 64, 8, 8]: 8.9 ns per element, on [200, 64, 4, 4]: 9.9 ns; the same data as rows: 1.2 ns; a 16x16 map
is fast as it is (1.3 ns). So every element-wise chain around a conv (GroupNorm's
affine, SiLU, the quantizer's scale and shift, the output's Δ_k, shift and bias) runs on the *rows view*
``rows(x)`` = [B, C/g, g·H·W], with g the fewest channels whose maps together fill a vector (g = 1 from 16
elements up); only the conv itself sees the 4D map. The reshapes between them cost nothing, and OpenVINO still
fuses each chain into one kernel. A per-channel vector meets the rows view through ``channel_vector`` (repeated
over the g·H·W row only when g > 1, i.e. C·H·W floats for maps under 16 elements).

Rule 3: GroupNorm is exported as reshape + layer_norm + affine (the same op): the plugin splits a GroupNormalization
that feeds a quantizer per group.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from quant.api import set_submodule

VECTOR = 16   # f32 lanes of an AVX-512 register: rows shorter than this take the plugin's slow path


def _fold(shape):
    """(C, g, n): channels, channels folded into one row, elements per channel map; shapes are static in a graph."""
    c, n = int(shape[1]), math.prod(int(s) for s in shape[2:])
    if n >= VECTOR:
        return c, 1, n
    g = next((g for g in range(1, c + 1) if c % g == 0 and g * n >= VECTOR), c)
    return c, g, n


def rows(x):
    """[B, C, *spatial] -> [B, C/g, g·prod(spatial)], the layout element-wise chains run in (rule 5)."""
    c, g, n = _fold(x.shape)
    return x.reshape(-1, c // g, g * n)


def channel_vector(v, shape):
    """A per-channel vector [C] broadcastable against rows() of a map of this shape."""
    c, g, n = _fold(shape)
    if g == 1:
        return v.view(1, c, 1)
    return v.view(c // g, g, 1).expand(c // g, g, n).reshape(1, c // g, g * n)


class GroupNormAsLayerNorm(nn.Module):
    """GroupNorm(G) as reshape to [B, G, -1] + layer_norm (rule 3), its per-channel affine on the rows view."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps = gn.num_groups, gn.eps
        self.weight = None if gn.weight is None else nn.Parameter(gn.weight.detach().clone(), requires_grad=False)
        self.bias = None if gn.bias is None else nn.Parameter(gn.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        shape = x.shape
        per_group = int(x[0].numel()) // self.groups   # static (channels and latent size are fixed in a graph)
        h = F.layer_norm(x.float().reshape(-1, self.groups, per_group), (per_group,), eps=self.eps)
        h = rows(h.reshape(shape))
        if self.weight is not None:
            h = h * channel_vector(self.weight, shape) + channel_vector(self.bias, shape)
        return h.reshape(shape).to(x.dtype)


def on_rows(fn, x):
    """fn (element-wise) applied on the rows view of a feature map; vectors [B, C] as they are (rule 5)."""
    return fn(x) if x.dim() < 3 else fn(rows(x)).reshape(x.shape)


class RowsSiLU(nn.Module):
    """nn.SiLU on the rows view of a feature map."""

    def forward(self, x):
        return on_rows(F.silu, x)


def rows_swish(x):
    """x·sigmoid(x), the DDIM Model's nonlinearity in its own spelling, on the rows view of a map."""
    return on_rows(lambda r: r * torch.sigmoid(r), x)


@contextlib.contextmanager
def engine_functions():
    """The DDIM Model calls its SiLU as a module-level function (ddim.models.diffusion.nonlinearity), which no module
    rewrite reaches: inside this block that name is rows_swish (the same values)."""
    from ddim.models import diffusion
    original = diffusion.nonlinearity
    diffusion.nonlinearity = rows_swish
    try:
        yield
    finally:
        diffusion.nonlinearity = original


def rewrite_for_engine(unet):
    """In place: GroupNorm -> GroupNormAsLayerNorm, nn.SiLU -> RowsSiLU (the same functions); returns unet."""
    for name, m in list(unet.named_modules()):
        if isinstance(m, nn.GroupNorm):
            set_submodule(unet, name, GroupNormAsLayerNorm(m))
        elif isinstance(m, nn.SiLU):
            set_submodule(unet, name, RowsSiLU())
    return unet
