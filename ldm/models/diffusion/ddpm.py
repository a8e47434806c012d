"""DDPM / LatentDiffusion as plain nn.Modules with the CompVis constructor arguments and state-dict layout.

State-dict order (checkpoint parity): the 12 schedule buffers (+ `scale_factor` when scale_by_std), then
`model.diffusion_model.*`, `model_ema.*` (use_ema), `first_stage_model.*`, `cond_stage_model.*`.
Only what inference, calibration and eps-prediction training need is here; Lightning hooks, logging and the
ancestral DDPM sampler of the original are not.
"""
import contextlib
from functools import partial

import numpy as np
import torch
import torch.nn as nn

from ldm.models.autoencoder import VQModelInterface
from ldm.models.diffusion.recorder import record_module_inputs
from ldm.modules.diffusionmodules.util import make_beta_schedule, extract_into_tensor
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config


class DiffusionWrapper(nn.Module):
    """Routes the conditioning to the UNet: concatenated to x, as cross-attention context, or as class labels."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm"):
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}")

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x] + list(c_concat), dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(list(c_crossattn), 1))
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x] + list(c_concat), dim=1), t,
                                        context=torch.cat(list(c_crossattn), 1))
        return self.diffusion_model(x, t, y=c_crossattn[0])  # adm


class DDPM(nn.Module):
    def __init__(self, unet_config, timesteps=1000, beta_schedule="linear", loss_type="l2", ckpt_path=None,
                 ignore_keys=(), load_only_unet=False, monitor="val/loss", use_ema=True, first_stage_key="image",
                 image_size=256, channels=3, log_every_t=100, clip_denoised=True, linear_start=1e-4,
                 linear_end=2e-2, cosine_s=8e-3, given_betas=None, original_elbo_weight=0.0, v_posterior=0.0,
                 l_simple_weight=1.0, conditioning_key=None, parameterization="eps", scheduler_config=None,
                 use_positional_encodings=False, learn_logvar=False, logvar_init=0.0, **lightning_only):
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ValueError('currently only supporting "eps" and "x0"')
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        self.logvar = torch.full((self.num_timesteps,), logvar_init)
        if learn_logvar:
            self.logvar = nn.Parameter(self.logvar, requires_grad=True)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys, only_model=load_only_unet)

    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                          linear_end=2e-2, cosine_s=8e-3):
        # computed in float64 numpy, stored as float32 buffers (the checkpoint values)
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            with torch.device("cpu"):  # host numpy values, also when the model is built under a meta device
                betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                           linear_end=linear_end, cosine_s=cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        to_torch = partial(torch.tensor, dtype=torch.float32)

        self.register_buffer("betas", to_torch(betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        self.register_buffer("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1.0 - alphas_cumprod)))
        self.register_buffer("log_one_minus_alphas_cumprod", to_torch(np.log(1.0 - alphas_cumprod)))
        self.register_buffer("sqrt_recip_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod)))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod - 1)))
        v = self.v_posterior
        posterior_variance = ((1 - v) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + v * betas)
        self.register_buffer("posterior_variance", to_torch(posterior_variance))
        # the variance is 0 at t=0: clip before the log
        self.register_buffer("posterior_log_variance_clipped",
                             to_torch(np.log(np.maximum(posterior_variance, 1e-20))))
        self.register_buffer("posterior_mean_coef1",
                             to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef2",
                             to_torch((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)))

        # VLB weights (float32 arithmetic on the buffers, as the original); not saved in checkpoints
        if self.parameterization == "eps":
            lvlb = self.betas ** 2 / (2 * self.posterior_variance * to_torch(alphas) * (1 - self.alphas_cumprod))
        else:
            acp = torch.tensor(alphas_cumprod, dtype=torch.float32)
            lvlb = 0.5 * torch.sqrt(acp) / (2.0 * 1 - acp)
        lvlb[0] = lvlb[1]
        self.register_buffer("lvlb_weights", lvlb, persistent=False)

    @property
    def device(self):
        return self.betas.device

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        """Temporarily swap the EMA weights into self.model (no-op without use_ema)."""
        if not self.use_ema:
            yield None
            return
        self.model_ema.store(self.model.parameters())
        self.model_ema.copy_to(self.model)
        try:
            yield None
        finally:
            self.model_ema.restore(self.model.parameters())

    def init_from_ckpt(self, path, ignore_keys=(), only_model=False):
        from ldm.util import load_state_dict_file, load_checked, IGNORABLE_MISSING_KEYS, \
            IGNORABLE_UNEXPECTED_KEYS
        sd = load_state_dict_file(path)
        sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in ignore_keys)}
        target = self.model if only_model else self
        load_checked(target, sd, IGNORABLE_UNEXPECTED_KEYS, IGNORABLE_MISSING_KEYS)

    # --- forward process ---------------------------------------------------------------------------------------
    def q_sample(self, x_start, t, noise=None):
        if noise is None:
            noise = torch.randn_like(x_start)
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def predict_start_from_noise(self, x_t, t, noise):
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def q_posterior(self, x_start, x_t, t):
        mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        var = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_var = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, var, log_var

    # --- training loss -----------------------------------------------------------------------------------------
    def get_loss(self, pred, target, mean=True):
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        if self.loss_type == "l2":
            return torch.nn.functional.mse_loss(target, pred, reduction="mean" if mean else "none")
        raise NotImplementedError(f"unknown loss type '{self.loss_type}'")

    def _weighted_loss(self, model_output, target, t):
        loss_simple = self.get_loss(model_output, target, mean=False).mean(dim=[1, 2, 3])
        logvar_t = self.logvar.to(self.device)[t]
        loss = (loss_simple / torch.exp(logvar_t) + logvar_t).mean() * self.l_simple_weight
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss = loss + self.original_elbo_weight * loss_vlb
        return loss, {"loss_simple": loss_simple.mean().detach(), "loss_vlb": loss_vlb.detach(),
                      "loss": loss.detach()}

    def _target(self, x_start, noise):
        return noise if self.parameterization == "eps" else x_start

    def sample_timesteps(self, batch_size, generator=None):
        device = generator.device if generator is not None else self.device
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device,
                             generator=generator).to(self.device)

    def _noise(self, x, generator):
        if generator is None:
            return torch.randn_like(x)
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)

    def p_losses(self, x_start, t, noise=None, generator=None):
        noise = self._noise(x_start, generator) if noise is None else noise
        x_noisy = self.q_sample(x_start, t, noise)
        return self._weighted_loss(self.model(x_noisy, t), self._target(x_start, noise), t)

    def forward(self, x, generator=None):
        return self.p_losses(x, self.sample_timesteps(x.shape[0], generator), generator=generator)


class LatentDiffusion(DDPM):
    def __init__(self, first_stage_config, cond_stage_config, num_timesteps_cond=None, cond_stage_key="image",
                 cond_stage_trainable=False, concat_mode=True, cond_stage_forward=None, conditioning_key=None,
                 scale_factor=1.0, scale_by_std=False, *args, **kwargs):
        self.num_timesteps_cond = 1 if num_timesteps_cond is None else num_timesteps_cond
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > 1:
            raise NotImplementedError("num_timesteps_cond > 1 (shortened conditioning schedule) is not supported")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config["params"]["ddconfig"]["ch_mult"]) - 1
        except (KeyError, TypeError):
            self.num_downs = 0
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def instantiate_first_stage(self, config):
        self.first_stage_model = instantiate_from_config(config).eval()
        for param in self.first_stage_model.parameters():
            param.requires_grad = False

    def instantiate_cond_stage(self, config):
        if not self.cond_stage_trainable:
            if config == "__is_first_stage__":
                self.cond_stage_model = self.first_stage_model
            elif config == "__is_unconditional__":
                self.cond_stage_model = None
            else:
                self.cond_stage_model = instantiate_from_config(config).eval()
                for param in self.cond_stage_model.parameters():
                    param.requires_grad = False
        else:
            if config in ("__is_first_stage__", "__is_unconditional__"):
                raise ValueError("a trainable cond stage needs its own config")
            self.cond_stage_model = instantiate_from_config(config)

    def train(self, mode=True):
        # frozen stages stay in eval mode, like the original's disabled_train
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    # --- conditioning and first stage --------------------------------------------------------------------------
    def get_learned_conditioning(self, c):
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    def get_first_stage_encoding(self, encoder_posterior, generator=None):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif torch.is_tensor(encoder_posterior):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        if predict_cids:
            raise NotImplementedError("predict_cids (codebook-id prediction) is not supported")
        z = 1.0 / self.scale_factor * z
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    # --- denoiser ----------------------------------------------------------------------------------------------
    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = self.model(x_noisy, t, **cond)
        return x_recon[0] if isinstance(x_recon, tuple) and not return_ids else x_recon

    def record_unet_inputs(self, uncond_context=None):
        """Context manager recording every UNet call's (x, t, context) on the CPU; see recorder.py.
        `with model.record_unet_inputs() as rec: ...` then rec.entries."""
        return record_module_inputs(self.model.diffusion_model, uncond_context)

    # --- training loss (eps / x0 prediction on latents) --------------------------------------------------------
    def p_losses(self, x_start, cond, t, noise=None, generator=None):
        noise = self._noise(x_start, generator) if noise is None else noise
        x_noisy = self.q_sample(x_start, t, noise)
        return self._weighted_loss(self.apply_model(x_noisy, t, cond), self._target(x_start, noise), t)

    def forward(self, x, c, generator=None):
        """Loss on latents x (already scaled) with raw conditioning c (encoded here if the cond stage trains)."""
        t = self.sample_timesteps(x.shape[0], generator)
        if self.model.conditioning_key is not None and self.cond_stage_trainable and c is not None:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, generator=generator)

    def get_input_latents(self, x, generator=None):
        """Image batch in [-1, 1] -> scaled latents z (the first stage is frozen)."""
        return self.get_first_stage_encoding(self.encode_first_stage(x), generator=generator).detach()

