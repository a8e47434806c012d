"""First-stage autoencoders of the LDMs: VQModel / VQModelInterface (VQ-f4) and AutoencoderKL (KL-f8).

Inference-side only: the training losses (`lossconfig`) are instantiated as given (the LDM configs use
torch.nn.Identity, which holds no state-dict keys); no Lightning training loop.
"""
import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Encoder, Decoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import instantiate_from_config

# Extra keys in official first-stage checkpoints that an inference model does not hold: the training loss
# (LPIPS + discriminator) lives under `loss.`.
FIRST_STAGE_IGNORABLE_PREFIXES = ("loss.",)


def _init_from_ckpt(module, path, ignore_keys):
    from ldm.util import load_state_dict_file, load_checked
    sd = load_state_dict_file(path)
    sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in ignore_keys)}
    load_checked(module, sd, ignorable_prefixes=FIRST_STAGE_IGNORABLE_PREFIXES)


class VQModel(nn.Module):
    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, batch_resize_range=None, scheduler_config=None,
                 lr_g_factor=1.0, remap=None, sane_index_shape=False, use_ema=False):
        super().__init__()
        if use_ema:
            raise NotImplementedError("VQModel: use_ema is not supported (no LDM first stage uses it)")
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap,
                                        sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            _init_from_ckpt(self, ckpt_path, ignore_keys)

    def encode_to_prequant(self, x):
        return self.quant_conv(self.encoder(x))

    def encode(self, x):
        quant, emb_loss, info = self.quantize(self.encode_to_prequant(x))
        return quant, emb_loss, info

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b):
        return self.decode(self.quantize.get_codebook_entry(code_b, None))

    def forward(self, input, return_pred_indices=False):
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)


class VQModelInterface(VQModel):
    """VQModel whose encode stops before the quantizer; decode quantizes first (unless forced not to)."""

    def __init__(self, embed_dim, *args, **kwargs):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h, force_not_quantize=False):
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None):
        super().__init__()
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True (the encoder emits mean and logvar)")
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            _init_from_ckpt(self, ckpt_path, ignore_keys)

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input, sample_posterior=True, generator=None):
        posterior = self.encode(input)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class IdentityFirstStage(nn.Module):
    def __init__(self, *args, vq_interface=False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def quantize(self, x, *args, **kwargs):
        return (x, None, [None, None, None]) if self.vq_interface else x

    def forward(self, x, *args, **kwargs):
        return x
