"""The LDM denoising UNet (ADM-style, Dhariwal & Nichol 2021, with optional cross-attention transformers).

Constructor arguments and state-dict keys match the CompVis checkpoints and YAML configs, so official
`unet_config` blocks build this class unchanged.
"""
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import AVMatMul, QKMatMul, SpatialTransformer
from ldm.modules.diffusionmodules.util import (avg_pool_nd, checkpoint, conv_nd, linear, normalization,
                                               timestep_embedding, zero_module)


class TimestepBlock(nn.Module):
    """A module whose forward also takes the timestep embedding."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given the timestep embedding `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands `emb` to TimestepBlocks and `context` to SpatialTransformers.

    A module replacing a SpatialTransformer (e.g. a quantization wrapper) receives `context` too if it sets the
    attribute `takes_context = True`; a wrapper of a ResBlock should subclass TimestepBlock.
    """

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer) or getattr(layer, "takes_context", False):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (spatial axes only for 3-D), optionally followed by a 3x3 conv."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or by average pooling (spatial axes only for 3-D)."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling (up/down) in the middle.

    With use_scale_shift_norm the embedding gives (scale, shift) applied after the output GroupNorm
    (AdaGN); otherwise it is added before it.
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # resample between the activation and the conv, so the conv runs at the new resolution
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """QKV attention on [B, heads*3*ch, T] input laid out per head as (q, k, v) (the original ADM order)."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads
        # q and k are each pre-scaled by ch^-1/4 (numerically safer than scaling the product), so the matmul
        # module itself applies no further scale.
        self.qk_matmul = QKMatMul(1.0)
        self.softmax = nn.Softmax(dim=-1)
        self.av_matmul = AVMatMul()

    def _attend(self, q, k, v):
        """q, k, v: [B*heads, ch, T] -> [B*heads, ch, T]."""
        ch = q.shape[1]
        scale = 1 / ch ** 0.25
        weight = self.qk_matmul((q * scale).transpose(1, 2), (k * scale).transpose(1, 2))  # [B*h, T, S]
        weight = self.softmax(weight.float()).type(weight.dtype)
        return self.av_matmul(weight, v.transpose(1, 2)).transpose(1, 2)  # [B*h, ch, T]

    def forward(self, qkv):
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        return self._attend(q, k, v).reshape(bs, -1, length)


class QKVAttention(QKVAttentionLegacy):
    """QKV attention on [B, 3*heads*ch, T] input laid out as (all q, all k, all v)."""

    def forward(self, qkv):
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return self._attend(q, k, v).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions of a feature map (norm, qkv Conv1d, attention, proj_out)."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert channels % num_head_channels == 0, (
                f"q,k,v channels {channels} is not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        # The original always checkpoints here, whatever use_checkpoint says; kept for identical training memory.
        return checkpoint(self._forward, (x,), self.parameters(), True)

    def _forward(self, x):
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        x = x.reshape(b, c, -1)
        h = self.attention(self.qkv(self.norm(x)))
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The full UNet with attention and timestep embedding.

    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which attention is inserted.
    :param num_heads / num_head_channels: fixed head count, or fixed width per head (then heads = ch // width).
    :param num_heads_upsample: head count in the decoder's AttentionBlocks (default: num_heads).
    :param legacy: reproduce the original head derivation (see _attention_heads).
    :param use_spatial_transformer: cross-attention SpatialTransformers instead of AttentionBlocks.
    :param num_classes: class-conditional via a label embedding added to the timestep embedding.
    :param n_embed: predict VQ codebook ids instead of the noise (id_predictor head).
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, use_fp16=False, num_heads=-1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
                 use_spatial_transformer=False, transformer_depth=1, context_dim=None, n_embed=None, legacy=True):
        super().__init__()
        if use_spatial_transformer:
            assert context_dim is not None, "You forgot to include the dimension of your cross-attention conditioning"
        if context_dim is not None:
            assert use_spatial_transformer, "You forgot to use the spatial transformer for your cross-attention"
            if not isinstance(context_dim, int):
                context_dim = list(context_dim)  # e.g. an omegaconf ListConfig
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_heads == -1:
            assert num_head_channels != -1, "Either num_heads or num_head_channels has to be set"
        if num_head_channels == -1:
            assert num_heads != -1, "Either num_heads or num_head_channels has to be set"

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def resblock(ch_in, ch_out, **kw):
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attention(ch, heads_for_block):
            # Mirrors the original derivation, including its quirk that num_heads is overwritten (and stays
            # overwritten for later blocks) when num_head_channels is set.
            nonlocal num_heads
            if num_head_channels == -1:
                dim_head = ch // num_heads
            else:
                num_heads = ch // num_head_channels
                dim_head = num_head_channels
            if legacy:
                dim_head = ch // num_heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:
                return SpatialTransformer(ch, num_heads, dim_head, depth=transformer_depth, context_dim=context_dim)
            return AttentionBlock(ch, use_checkpoint=use_checkpoint,
                                  num_heads=num_heads if heads_for_block is None else heads_for_block,
                                  num_head_channels=dim_head, use_new_attention_order=use_new_attention_order)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        self._feature_size = model_channels
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, None))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                out_ch = ch
                down = (resblock(ch, out_ch, down=True) if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=out_ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2
                self._feature_size += ch

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch),
            attention(ch, None),
            resblock(ch, ch),
        )
        self._feature_size += ch

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(resblock(ch, out_ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(
                normalization(ch),
                conv_nd(dims, model_channels, n_embed, 1),
            )

    def convert_to_fp16(self):
        """Cast the torso's convolutions (input, middle and output blocks) to float16."""
        self._cast_torso_convs(torch.float16)

    def convert_to_fp32(self):
        self._cast_torso_convs(torch.float32)

    def _cast_torso_convs(self, dtype):
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in blocks.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    m.to(dtype)

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        """
        :param x: [N, C, ...] noisy input.
        :param timesteps: [N] timesteps.
        :param context: [N, L, context_dim] cross-attention conditioning (SpatialTransformer only).
        :param y: [N] class labels, if class-conditional.
        :return: [N, out_channels, ...] (or codebook logits with n_embed).
        """
        assert (y is not None) == (self.num_classes is not None), \
            "must specify y if and only if the model is class-conditional"
        hs = []
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)

        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        h = h.type(x.dtype)
        if self.predict_codebook_ids:
            return self.id_predictor(h)
        return self.out(h)

