"""DDIM sampler (Song et al. 2021) with the CompVis API, classifier-free guidance and img2img helpers.

Numerics follow the original: schedule values are taken with their original types and broadcast with
torch.full (float32); per-step noise is drawn even when eta=0 (then scaled by 0), so the global RNG advances
exactly as in the original. Pass `generator` to draw x_T and the per-step noise from it instead.
"""
import numpy as np
import torch
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import (make_ddim_sampling_parameters, make_ddim_timesteps, noise_like,
                                               extract_into_tensor)


def _cat_cond(uc, c):
    """[uncond; cond] along the batch, for tensors, lists of tensors or dicts of lists (as the SD sampler)."""
    if isinstance(c, dict):
        return {k: ([torch.cat([uc[k][i], c[k][i]]) for i in range(len(c[k]))] if isinstance(c[k], list)
                    else torch.cat([uc[k], c[k]])) for k in c}
    if isinstance(c, list):
        return [torch.cat([u, ci]) for u, ci in zip(uc, c)]
    return torch.cat([uc, c])


def _randn(shape, device, generator=None, repeat=False):
    if generator is None:
        return noise_like(shape, device, repeat)
    draw_shape = (1, *shape[1:]) if repeat else shape
    noise = torch.randn(draw_shape, generator=generator, device=generator.device).to(device)
    return noise.repeat(shape[0], *((1,) * (len(shape) - 1))) if repeat else noise


class DDIMSampler:
    def __init__(self, model, schedule="linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    def register_buffer(self, name, attr):
        # plain attribute (the original also moved it to CUDA; here tensors stay on the model's device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        self.ddim_timesteps = make_ddim_timesteps(ddim_discr_method=ddim_discretize,
                                                  num_ddim_timesteps=ddim_num_steps,
                                                  num_ddpm_timesteps=self.ddpm_num_timesteps, verbose=verbose)
        alphas_cumprod = self.model.alphas_cumprod
        assert alphas_cumprod.shape[0] == self.ddpm_num_timesteps, "alphas have to be defined for each timestep"
        to_torch = lambda x: x.clone().detach().to(torch.float32).to(self.model.device)  # noqa: E731

        self.register_buffer("betas", to_torch(self.model.betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(self.model.alphas_cumprod_prev))
        # float32 numpy ufuncs as the original (torch's vectorised float32 sqrt can differ by 1 ulp)
        acp = alphas_cumprod.detach().cpu().numpy()
        np_to_torch = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(self.model.device)  # noqa: E731
        self.register_buffer("sqrt_alphas_cumprod", np_to_torch(np.sqrt(acp)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", np_to_torch(np.sqrt(1.0 - acp)))
        self.register_buffer("log_one_minus_alphas_cumprod", np_to_torch(np.log(1.0 - acp)))
        self.register_buffer("sqrt_recip_alphas_cumprod", np_to_torch(np.sqrt(1.0 / acp)))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", np_to_torch(np.sqrt(1.0 / acp - 1)))

        ddim_sigmas, ddim_alphas, ddim_alphas_prev = make_ddim_sampling_parameters(
            alphacums=alphas_cumprod.cpu(), ddim_timesteps=self.ddim_timesteps, eta=ddim_eta, verbose=verbose)
        self.register_buffer("ddim_sigmas", ddim_sigmas)
        self.register_buffer("ddim_alphas", ddim_alphas)
        self.register_buffer("ddim_alphas_prev", ddim_alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", torch.from_numpy(np.sqrt((1.0 - ddim_alphas).numpy())))
        sigmas_orig = ddim_eta * torch.sqrt((1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
                                            * (1 - self.alphas_cumprod / self.alphas_cumprod_prev))
        self.register_buffer("ddim_sigmas_for_original_num_steps", sigmas_orig)

    @staticmethod
    def _check_batch(conditioning, batch_size):
        if conditioning is None:
            return
        c = conditioning
        while isinstance(c, (dict, list)):
            c = list(c.values())[0] if isinstance(c, dict) else c[0]
        if torch.is_tensor(c) and c.shape[0] != batch_size:
            print(f"Warning: Got {c.shape[0]} conditionings but batch-size is {batch_size}")

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0,
               noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               generator=None, progress=True, **kwargs):
        self._check_batch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        return self.ddim_sampling(conditioning, size, callback=callback, img_callback=img_callback,
                                  quantize_denoised=quantize_x0, mask=mask, x0=x0, ddim_use_original_steps=False,
                                  noise_dropout=noise_dropout, temperature=temperature,
                                  score_corrector=score_corrector, corrector_kwargs=corrector_kwargs, x_T=x_T,
                                  log_every_t=log_every_t, unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning, generator=generator,
                                  progress=progress)

    # --- shared by DDIM and PLMS -------------------------------------------------------------------------------
    def _timesteps(self, ddim_use_original_steps, timesteps):
        if timesteps is None:
            return self.ddpm_num_timesteps if ddim_use_original_steps else self.ddim_timesteps
        if not ddim_use_original_steps:
            subset_end = int(min(timesteps / self.ddim_timesteps.shape[0], 1) * self.ddim_timesteps.shape[0]) - 1
            return self.ddim_timesteps[:subset_end]
        return timesteps

    def _initial(self, shape, x_T, generator):
        device = self.model.betas.device
        return (_randn(shape, device, generator) if x_T is None else x_T), device

    def get_model_output(self, x, t, c, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
                         score_corrector=None, corrector_kwargs=None):
        """eps prediction, guided as e_u + s * (e_c - e_u) from one batched [uncond; cond] call."""
        if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
            e_t = self.model.apply_model(x, t, c)
        else:
            x_in = torch.cat([x] * 2)
            t_in = torch.cat([t] * 2)
            c_in = _cat_cond(unconditional_conditioning, c)
            e_t_uncond, e_t = self.model.apply_model(x_in, t_in, c_in).chunk(2)
            e_t = e_t_uncond + unconditional_guidance_scale * (e_t - e_t_uncond)
        if score_corrector is not None:
            assert self.model.parameterization == "eps"
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))
        return e_t

    def _schedule_arrays(self, use_original_steps):
        if use_original_steps:
            return (self.model.alphas_cumprod, self.model.alphas_cumprod_prev,
                    self.model.sqrt_one_minus_alphas_cumprod, self.ddim_sigmas_for_original_num_steps)
        return self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sqrt_one_minus_alphas, self.ddim_sigmas

    def x_prev_and_pred_x0(self, x, e_t, index, use_original_steps=False, quantize_denoised=False,
                           temperature=1.0, noise_dropout=0.0, repeat_noise=False, generator=None):
        """One DDIM update x_t -> x_{t_prev} for eps e_t at schedule position `index`."""
        b, device = x.shape[0], x.device
        alphas, alphas_prev, sqrt_one_minus_alphas, sigmas = self._schedule_arrays(use_original_steps)
        full = lambda v: torch.full((b, 1, 1, 1), float(v), device=device)  # noqa: E731  (float32, as the original)
        a_t, a_prev = full(alphas[index]), full(alphas_prev[index])
        sigma_t, sqrt_one_minus_at = full(sigmas[index]), full(sqrt_one_minus_alphas[index])
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        if quantize_denoised:
            pred_x0, _, *_ = self.model.first_stage_model.quantize(pred_x0)
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * _randn(x.shape, device, generator, repeat_noise) * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0

    def _iterator(self, time_range, total_steps, desc, progress):
        return tqdm(time_range, desc=desc, total=total_steps) if progress else time_range

    # --- DDIM --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ddim_sampling(self, cond, shape, x_T=None, ddim_use_original_steps=False, callback=None, timesteps=None,
                      quantize_denoised=False, mask=None, x0=None, img_callback=None, log_every_t=100,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, generator=None,
                      progress=True):
        b = shape[0]
        img, device = self._initial(shape, x_T, generator)
        timesteps = self._timesteps(ddim_use_original_steps, timesteps)
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        time_range = reversed(range(0, timesteps)) if ddim_use_original_steps else np.flip(timesteps)
        total_steps = timesteps if ddim_use_original_steps else timesteps.shape[0]
        for i, step in enumerate(self._iterator(time_range, total_steps, "DDIM Sampler", progress)):
            index = total_steps - i - 1
            ts = torch.full((b,), int(step), device=device, dtype=torch.long)
            if mask is not None:
                assert x0 is not None
                img_orig = self.model.q_sample(x0, ts)  # global-RNG noise, as the original
                img = img_orig * mask + (1.0 - mask) * img
            img, pred_x0 = self.p_sample_ddim(img, cond, ts, index=index, use_original_steps=ddim_use_original_steps,
                                              quantize_denoised=quantize_denoised, temperature=temperature,
                                              noise_dropout=noise_dropout, score_corrector=score_corrector,
                                              corrector_kwargs=corrector_kwargs,
                                              unconditional_guidance_scale=unconditional_guidance_scale,
                                              unconditional_conditioning=unconditional_conditioning,
                                              generator=generator)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, generator=None):
        e_t = self.get_model_output(x, t, c, unconditional_guidance_scale, unconditional_conditioning,
                                    score_corrector, corrector_kwargs)
        return self.x_prev_and_pred_x0(x, e_t, index, use_original_steps, quantize_denoised, temperature,
                                       noise_dropout, repeat_noise, generator)

    # --- img2img -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None, generator=None):
        """q(x_t | x0) at DDIM schedule position t (a [B] long tensor of indices into ddim_timesteps)."""
        if use_original_steps:
            sqrt_ac, sqrt_one_minus_ac = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_ac, sqrt_one_minus_ac = torch.sqrt(self.ddim_alphas), self.ddim_sqrt_one_minus_alphas
        if noise is None:
            noise = torch.randn_like(x0) if generator is None else _randn(x0.shape, x0.device, generator)
        t = t.to(sqrt_ac.device)
        return (extract_into_tensor(sqrt_ac, t, x0.shape).to(x0.device) * x0
                + extract_into_tensor(sqrt_one_minus_ac, t, x0.shape).to(x0.device) * noise)

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False, generator=None, progress=True):
        """Denoise from DDIM position t_start down to 0 (img2img after stochastic_encode)."""
        timesteps = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        timesteps = timesteps[:t_start]
        time_range = np.flip(timesteps)
        total_steps = timesteps.shape[0]
        x_dec = x_latent
        for i, step in enumerate(self._iterator(time_range, total_steps, "Decoding image", progress)):
            index = total_steps - i - 1
            ts = torch.full((x_latent.shape[0],), int(step), device=x_latent.device, dtype=torch.long)
            x_dec, _ = self.p_sample_ddim(x_dec, cond, ts, index=index, use_original_steps=use_original_steps,
                                          unconditional_guidance_scale=unconditional_guidance_scale,
                                          unconditional_conditioning=unconditional_conditioning,
                                          generator=generator)
        return x_dec
