"""Cross-attention transformer used by the LDM / Stable Diffusion UNet (SpatialTransformer and its parts).

Module names and state-dict keys follow the CompVis checkpoints. The two attention matmuls and the softmax are
separate parameter-free submodules (`qk_matmul`, `softmax`, `av_matmul`) so that a quantizer can wrap them
without rewriting any forward.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import checkpoint, zero_module


def exists(val):
    return val is not None


def default(val, d):
    if exists(val):
        return val
    return d() if callable(d) else d


def Normalize(in_channels):
    """GroupNorm(32) with eps 1e-6, the normalisation in front of a SpatialTransformer."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class QKMatMul(nn.Module):
    """Attention logits: q [B, N, d] x k [B, M, d] -> [B, N, M], times a fixed scale.

    Holds no parameters; it exists so quantizers can intercept the two operands.
    """

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, q, k):
        return torch.einsum("bid,bjd->bij", q, k) * self.scale

    def extra_repr(self):
        return f"scale={self.scale}"


class AVMatMul(nn.Module):
    """Attention readout: probabilities [B, N, M] x v [B, M, d] -> [B, N, d]. Parameter-free."""

    def forward(self, attn, v):
        return torch.einsum("bij,bjd->bid", attn, v)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): value * gelu(gate), both halves from one Linear."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: net = [GEGLU or Linear+GELU, Dropout, Linear]."""

    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when context is None)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.qk_matmul = QKMatMul(self.scale)
        self.softmax = nn.Softmax(dim=-1)
        self.av_matmul = AVMatMul()

    def _split_heads(self, t):
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

    def forward(self, x, context=None, mask=None):
        context = default(context, x)
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        sim = self.qk_matmul(q, k)
        if exists(mask):
            # mask: [B, M] (or [B, ...] flattened) with True = attend
            mask = mask.reshape(mask.shape[0], -1).repeat_interleave(self.heads, dim=0)[:, None, :]
            sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
        attn = self.softmax(sim)
        out = self.av_matmul(attn, v)
        bh, n, d = out.shape
        out = out.reshape(bh // self.heads, self.heads, n, d).permute(0, 2, 1, 3).reshape(bh // self.heads, n, -1)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and gated MLP, each pre-LayerNorm with a residual.

    `checkpoint` defaults to True as in the original, where SpatialTransformer never overrides it: the transformer
    blocks are always gradient-checkpointed during training.
    """

    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, 1x1 proj_in, blocks on [B, HW, C], 1x1 proj_out
    (zero-initialised, so a fresh block is the identity), residual."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None):
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim)
             for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        return self.proj_out(x) + x_in

