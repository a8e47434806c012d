"""Building blocks shared by the diffusion UNet and the samplers.

Layer helpers (conv_nd, normalization, ...), the sinusoidal timestep embedding, gradient checkpointing that
replays the caller's contextvars during recomputation, and the DDPM/DDIM schedule helpers. Schedule helpers
reproduce the original numerics and dtypes bit for bit (tests/ldm/test_schedules.py checks them against
reference/ldm/vectors/schedules.pt).
"""
import contextvars
import math

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------

def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """Beta schedule as a float64 numpy array of length n_timestep.

    'linear' is the LDM one: linear in sqrt(beta), squared (not linear in beta despite its name).
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        # Nichol & Dhariwal: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), betas clipped at 0.999.
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alpha_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"schedule '{schedule}' unknown.")
    return betas.numpy()


def make_ddim_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, verbose=True):
    """DDPM timesteps visited by DDIM, ascending, as an int64 numpy array.

    'uniform' takes range(0, T, T // S), so S that does not divide T yields more than S steps (S=7 -> 8).
    The +1 shift (alpha_cumprod at the final step equals alpha_0 rather than 1) is kept as in the original,
    including its consequence that S = T produces timestep T and fails on indexing.
    """
    if ddim_discr_method == "uniform":
        stride = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, stride)))
    elif ddim_discr_method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(f"There is no ddim discretization method called '{ddim_discr_method}'")
    steps_out = steps + 1
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps_out}")
    return steps_out


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta, verbose=True):
    """(sigmas, alphas, alphas_prev) for DDIM (Song et al. eq. 16):
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).

    With a torch tensor `alphacums` (what the sampler passes: the model's float32 alphas_cumprod) the original
    returns mixed types, reproduced here: alphas is a tensor of alphacums' dtype, alphas_prev a float64 numpy
    array holding those values, sigmas a float64 tensor.
    With a numpy `alphacums` everything is numpy.
    """
    idx = np.asarray(ddim_timesteps)
    if isinstance(alphacums, torch.Tensor):
        alphas = alphacums[torch.as_tensor(idx, dtype=torch.long)]
        prev_idx = torch.as_tensor(idx[:-1], dtype=torch.long)
        alphas_prev = np.asarray([alphacums[0].item()] + alphacums[prev_idx].tolist(), dtype=np.float64)
        # The original evaluates numpy-float64 / torch-float32 through Tensor.__rtruediv__, which is
        # reciprocal(1 - alphas) in float32 times the float64 numerator; alphas / alphas_prev promotes alphas to
        # float64 first; the square root is numpy's (torch's vectorised float64 sqrt can differ by 1 ulp).
        # Replicated step by step so the float64 sigmas match bit for bit.
        a_prev = torch.from_numpy(alphas_prev)
        ratio = (1 - a_prev) * (1 - alphas).reciprocal()
        radicand = ratio * (1 - alphas.to(torch.float64) / a_prev)
        sigmas = eta * torch.from_numpy(np.sqrt(radicand.cpu().numpy()))
    else:
        alphacums = np.asarray(alphacums)
        alphas = alphacums[idx]
        alphas_prev = np.asarray([alphacums[0]] + alphacums[idx[:-1]].tolist())
        sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {alphas}; a_(t-1): {alphas_prev}")
        print(f"For the chosen value of eta, which is {eta}, this results in the following sigma_t schedule for "
              f"ddim sampler {sigmas}")
    return sigmas, alphas, alphas_prev


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas (float64 numpy)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def extract_into_tensor(a, t, x_shape):
    """Gather a[t] per batch element and reshape to broadcast against a tensor of shape x_shape."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def noise_like(shape, device, repeat=False):
    """Standard normal noise from the global RNG (the samplers' reference vectors depend on this draw order).
    repeat=True draws one sample and repeats it over the batch."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------

def checkpoint(func, inputs, params, flag):
    """Evaluate func(*inputs), trading memory for a recomputation in backward when `flag` is set.

    The recomputation runs inside a copy of the contextvars context captured here, so per-call ambient state
    (e.g. a quantizer's current step index held in a ContextVar) is the same in forward and in the replay even if
    the caller changed it before calling backward. `params` is accepted for API compatibility: the non-reentrant
    torch checkpoint tracks every parameter func touches, so parameter gradients are correct regardless.
    """
    if not flag or not torch.is_grad_enabled():
        return func(*inputs)
    ctx = contextvars.copy_context()
    calls = [0]

    def run(*args):
        calls[0] += 1
        if calls[0] == 1:
            return func(*args)  # the forward itself runs in the caller's live context
        # A fresh copy per replay keeps repeated backward passes (retain_graph) independent of each other.
        return ctx.copy().run(func, *args)

    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------

def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Sinusoidal embedding [cos(t*f_0..f_{h-1}) | sin(t*f_0..f_{h-1})] with f_i = max_period^(-i/h), h = dim//2.

    An odd dim gets a trailing zero column. repeat_only=True repeats the raw timestep instead.
    """
    if repeat_only:
        return timesteps[:, None].repeat(1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device)
                      / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module):
    """Zero a module's parameters in place (residual branches start as identity) and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """Scale a module's parameters in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the input dtype (fp16 statistics are too coarse)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    """The UNet's standard normalisation layer: 32-group GroupNorm computed in float32."""
    return GroupNorm32(32, channels)


class SiLU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def conv_nd(dims, *args, **kwargs):
    """nn.Conv1d/2d/3d by dimensionality."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs):
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """nn.AvgPool1d/2d/3d by dimensionality."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")
