"""PLMS sampler (pseudo linear multi-step, Liu et al. 2022) with the CompVis API.

The first step is a two-evaluation improved-Euler step (the second UNet call at t_next); later steps use
Adams-Bashforth combinations of up to four stored eps. It reuses DDIMSampler's schedule, guided model call and
update (with eta = 0); like the original, the update still draws (zero-scaled) noise, twice in the first step.
"""
import numpy as np
import torch

from ldm.models.diffusion.ddim import DDIMSampler


class PLMSSampler(DDIMSampler):
    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0,
               noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               generator=None, progress=True, **kwargs):
        if eta != 0:
            raise ValueError("eta must be 0 for PLMS")
        self._check_batch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        return self.plms_sampling(conditioning, size, callback=callback, img_callback=img_callback,
                                  quantize_denoised=quantize_x0, mask=mask, x0=x0, ddim_use_original_steps=False,
                                  noise_dropout=noise_dropout, temperature=temperature,
                                  score_corrector=score_corrector, corrector_kwargs=corrector_kwargs, x_T=x_T,
                                  log_every_t=log_every_t, unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning, generator=generator,
                                  progress=progress)

    @torch.no_grad()
    def plms_sampling(self, cond, shape, x_T=None, ddim_use_original_steps=False, callback=None, timesteps=None,
                      quantize_denoised=False, mask=None, x0=None, img_callback=None, log_every_t=100,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, generator=None,
                      progress=True):
        b = shape[0]
        img, device = self._initial(shape, x_T, generator)
        timesteps = self._timesteps(ddim_use_original_steps, timesteps)
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        time_range = list(reversed(range(0, timesteps))) if ddim_use_original_steps else np.flip(timesteps)
        total_steps = timesteps if ddim_use_original_steps else timesteps.shape[0]
        old_eps = []
        for i, step in enumerate(self._iterator(time_range, total_steps, "PLMS Sampler", progress)):
            index = total_steps - i - 1
            ts = torch.full((b,), int(step), device=device, dtype=torch.long)
            ts_next = torch.full((b,), int(time_range[min(i + 1, len(time_range) - 1)]), device=device,
                                 dtype=torch.long)
            if mask is not None:
                assert x0 is not None
                img_orig = self.model.q_sample(x0, ts)
                img = img_orig * mask + (1.0 - mask) * img
            img, pred_x0, e_t = self.p_sample_plms(
                img, cond, ts, index=index, use_original_steps=ddim_use_original_steps,
                quantize_denoised=quantize_denoised, temperature=temperature, noise_dropout=noise_dropout,
                score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, old_eps=old_eps, t_next=ts_next,
                generator=generator)
            old_eps.append(e_t)
            if len(old_eps) >= 4:
                old_eps.pop(0)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    @torch.no_grad()
    def p_sample_plms(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, old_eps=None,
                      t_next=None, generator=None):
        def model_eps(x_, t_):
            return self.get_model_output(x_, t_, c, unconditional_guidance_scale, unconditional_conditioning,
                                         score_corrector, corrector_kwargs)

        def update(e):
            return self.x_prev_and_pred_x0(x, e, index, use_original_steps, quantize_denoised, temperature,
                                           noise_dropout, repeat_noise, generator)

        old_eps = old_eps or []
        e_t = model_eps(x, t)
        if len(old_eps) == 0:
            # Pseudo improved Euler (2nd order Heun-like) for the first step
            x_prev, _ = update(e_t)
            e_t_prime = (e_t + model_eps(x_prev, t_next)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = update(e_t_prime)
        return x_prev, pred_x0, e_t
