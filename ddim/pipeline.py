"""PixelDiffusion: the small LatentDiffusion surface the quantization pipeline uses, for a pixel-space ddim Model.

The numbered scripts and quant/ reach a LatentDiffusion through `model.model.diffusion_model` (the network they
wrap or swap), `apply_model`, the schedule buffers, `channels` / `image_size`, `decode_first_stage`,
`cond_stage_model` / `conditioning_key` and `record_unet_inputs`. PixelDiffusion offers exactly these for the
DDIM-paper UNet; the first stage is the identity (pixel space) and there is no conditioning.

Sampling (`sample`) follows ddim.functions.denoising.generalized_steps step for step (same pairs, same
compute_alpha arithmetic, one noise draw per step), through `apply_model`, so a swapped-in quantized network,
the recorder's hook and an optional per-step context (`step_scope`) all see every call. With
`generator=None` the per-step noise is torch.randn_like (the original, global RNG) and the result equals
generalized_steps' last x bit for bit; with a torch.Generator it is drawn from that generator (on the
generator's device, then moved).

Repeated timesteps: see ddim.functions.denoising. An identity step (t == t_next, e.g. (0, 0) in quad-100)
returns x_t up to float rounding for every eta, whatever the network outputs there, so its output never
reaches the sample; the calls sharing a timestep value in one trajectory share their input x_t.
"""
import contextlib

import torch
import torch.nn as nn

from ddim.checkpoint import load_model_weights
from ddim.config import load_config
from ddim.functions.denoising import compute_alpha, ddim_update, step_pairs
from ddim.models.diffusion import Model
from ddim.runners.diffusion import betas_from_config, timestep_sequence
from ldm.models.diffusion.recorder import record_module_inputs


class DiffusionModelHolder(nn.Module):
    """Plays LatentDiffusion.model (the DiffusionWrapper): holds `diffusion_model`, which callers may swap."""

    conditioning_key = None

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t):
        return self.diffusion_model(x, t)


class PixelDiffusion(nn.Module):
    """A ddim Model with its schedule, driven like a LatentDiffusion (eps-prediction, pixel space)."""

    parameterization = "eps"
    cond_stage_model = None
    cond_stage_key = None
    conditioning_key = None
    first_stage_model = None
    use_ema = False

    def __init__(self, config, diffusion_model=None):
        super().__init__()
        self.config = config
        self.model = DiffusionModelHolder(Model(config) if diffusion_model is None else diffusion_model)
        self.channels = int(config.model.in_channels)
        self.image_size = int(config.data.image_size)
        betas = betas_from_config(config)
        self.num_timesteps = int(betas.shape[0])
        # float32 arithmetic on float32 betas, so alphas_cumprod[t] == compute_alpha(betas, t) exactly
        alphas_cumprod = (1 - betas).cumprod(dim=0)
        buffers = {"betas": betas, "alphas_cumprod": alphas_cumprod,
                   "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1]]),
                   "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
                   "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt()}
        for name, value in buffers.items():  # not saved: the state dict is the network's weights only
            self.register_buffer(name, value, persistent=False)

    @property
    def device(self):
        return self.betas.device

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        """No-op (the EMA weights, if any, are the checkpoint's weights)."""
        yield None

    # --- the LatentDiffusion surface -------------------------------------------------------------------------
    def apply_model(self, x, t, cond=None):
        """ε prediction of the current diffusion_model at x [B,C,R,R], t [B] (float or integer values)."""
        if cond is not None:
            raise ValueError("PixelDiffusion is unconditional; pass cond=None")
        return self.model.diffusion_model(x, t)

    def decode_first_stage(self, x):
        """Identity: samples are already pixels in [-1, 1]."""
        return x

    def encode_first_stage(self, x):
        return x

    def get_input_latents(self, x, generator=None):
        """Images in [-1, 1] are the model's input space."""
        return x

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε for integer t [B]."""
        shape = (-1,) + (1,) * (x_start.dim() - 1)
        return (self.sqrt_alphas_cumprod[t].view(shape) * x_start
                + self.sqrt_one_minus_alphas_cumprod[t].view(shape) * noise)

    def record_unet_inputs(self, uncond_context=None):
        """Context manager recording every network call's (x, t) on the CPU (t stored as integers); see
        ldm.models.diffusion.recorder. `with model.record_unet_inputs() as rec: ...` then rec.entries."""
        return record_module_inputs(self.model.diffusion_model, uncond_context)

    # --- sampling --------------------------------------------------------------------------------------------
    def timestep_sequence(self, steps, skip_type="quad"):
        """The ascending DDIM sequence `seq` of the original runner (quad-100: 100 values, 96 distinct)."""
        return timestep_sequence(skip_type, steps, self.num_timesteps)

    @torch.no_grad()
    def sample(self, x_T, steps, skip_type="quad", eta=0.0, generator=None, callback=None, step_scope=None):
        """DDIM (generalized_steps) from x_T; returns the final x on the model's device.

        callback: called after every step with a dict {i (step index, 0 = first), t, t_next, x (input x_t),
            x_next, x0 (predicted x̂0)}.
        step_scope: optional callable k -> context manager entered around the network call of step k (k in
            sampling order, 0..len(seq)-1), e.g. quant.step.step_scope for per-step quantizers.
        """
        x = x_T.to(self.device)
        seq = self.timestep_sequence(steps, skip_type)
        n = x.shape[0]
        for k, (i, j) in enumerate(step_pairs(seq)):
            t = (torch.ones(n) * i).to(x.device)
            at = compute_alpha(self.betas, t.long())
            at_next = compute_alpha(self.betas, (torch.ones(n) * j).to(x.device).long())
            with (step_scope(k) if step_scope is not None else contextlib.nullcontext()):
                eps = self.apply_model(x, t)
            if generator is None:
                noise = torch.randn_like(x)
            else:
                noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
            x0, x_next = ddim_update(x, eps, at, at_next, eta, noise)
            if callback is not None:
                callback({"i": k, "t": i, "t_next": j, "x": x, "x_next": x_next, "x0": x0})
            x = x_next
        return x


def load_pixel_model(config_path, ckpt_path, device="cpu", download_name=None):
    """PixelDiffusion from a ddim YAML config and a checkpoint (strict, safe), in eval mode on `device`."""
    config = load_config(config_path)
    model = PixelDiffusion(config)
    container = load_model_weights(model.model.diffusion_model, ckpt_path, download_name)
    model.training_record = container.get("training")
    return model.to(device).eval()
