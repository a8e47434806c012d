"""The DDPM UNet of the DDIM paper (ermongroup/ddim `models/diffusion.py`), written from its description.

Module names, registration order and constructor fields follow the original so that its checkpoints
(a bare `state_dict`) load strictly: `temb.dense.{0,1}`, `conv_in`, `down.{i}.{block,attn,downsample}`,
`mid.{block_1,attn_1,block_2}`, `up.{i}.{block,attn,upsample}` (index 0 = highest resolution, although the
decoder runs from the lowest), `norm_out`, `conv_out`.

Two things are kept visible for quantizers, without changing any key:
- every decoder ResnetBlock takes cat([h, skip]) and records `h_channels` (channels of h, the split point of
  its input, e.g. for a split nin_shortcut quantizer); encoder and middle blocks have h_channels None;
- AttnBlock's two matmuls and its softmax are parameter-free submodules (`qk_matmul`, `softmax`,
  `av_matmul`, the same classes as ldm's attention), so a quantizer can wrap them.
The model keeps no state between calls.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import AVMatMul, QKMatMul


def get_timestep_embedding(timesteps, embedding_dim):
    """Sinusoidal embedding of (float) timesteps [B] -> [B, embedding_dim]: sin half then cos half,
    frequencies exp(-log(1e4) * i / (half - 1)); zero-padded when the dimension is odd."""
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be 1-D [B], got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(timesteps.device)
    angles = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def nonlinearity(x):
    """Swish / SiLU, written as x * sigmoid(x) like the original."""
    return x * torch.sigmoid(x)


def Normalize(in_channels):
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv when with_conv."""

    def __init__(self, in_channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """3x3 stride-2 conv after an asymmetric zero pad (right and bottom only) when with_conv, else 2x2 avg pool."""

    def __init__(self, in_channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """norm1, swish, conv1, + temb_proj(swish(temb)), norm2, swish, dropout, conv2; residual through
    nin_shortcut (1x1) or conv_shortcut (3x3) when the channel count changes.

    h_channels: for a decoder block whose input is cat([h, skip]), the channels of h (None otherwise).
    """

    def __init__(self, *, in_channels, out_channels=None, conv_shortcut=False, dropout, temb_channels=512,
                 h_channels=None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut
        self.h_channels = h_channels
        # registration order = state-dict order of the original
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x, temb):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v, proj_out and logits scaled by C^-0.5."""

    def __init__(self, in_channels):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        # parameter-free: no state-dict keys
        self.qk_matmul = QKMatMul(int(in_channels) ** (-0.5))
        self.softmax = nn.Softmax(dim=-1)
        self.av_matmul = AVMatMul()

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        tokens = lambda t: t.reshape(b, c, hh * ww).permute(0, 2, 1)  # noqa: E731  [B, HW, C]
        attn = self.softmax(self.qk_matmul(tokens(q), tokens(k)))  # [B, HW(query), HW(key)]
        out = self.av_matmul(attn, tokens(v))  # [B, HW, C]
        out = out.permute(0, 2, 1).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Model(nn.Module):
    """The DDIM-paper UNet, built from a ddim config namespace (config.model.*, config.data.image_size,
    config.diffusion.num_diffusion_timesteps). forward(x [B,C,R,R], t [B] float) -> eps [B,out_ch,R,R]."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        m = config.model
        ch, out_ch, ch_mult = m.ch, m.out_ch, tuple(m.ch_mult)
        num_res_blocks, attn_resolutions, dropout = m.num_res_blocks, m.attn_resolutions, m.dropout
        in_channels, resamp_with_conv = m.in_channels, m.resamp_with_conv
        resolution = config.data.image_size
        if m.type == "bayesian":
            self.logvar = nn.Parameter(torch.zeros(config.diffusion.num_diffusion_timesteps))

        self.ch = ch
        self.temb_ch = ch * 4
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        # encoder; skip_channels tracks what each entry of the forward's skip stack holds
        in_ch_mult = (1,) + ch_mult
        curr_res = resolution
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                               temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
                skip_channels.append(block_in)
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
                skip_channels.append(block_in)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch,
                                       dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch,
                                       dropout=dropout)

        # decoder: built from the lowest resolution up, stored with index 0 at the highest
        levels = []
        for i_level in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                skip_in = skip_channels.pop()
                level.block.append(ResnetBlock(in_channels=block_in + skip_in, out_channels=block_out,
                                               temb_channels=self.temb_ch, dropout=dropout, h_channels=block_in))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, x, t):
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(f"expected {self.resolution}x{self.resolution} inputs, got {tuple(x.shape[2:])}")
        temb = get_timestep_embedding(t, self.ch)
        temb = self.temb.dense[1](nonlinearity(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for i_level in range(self.num_resolutions):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](hs[-1], temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(level.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)

        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)

        return self.conv_out(nonlinearity(self.norm_out(h)))
