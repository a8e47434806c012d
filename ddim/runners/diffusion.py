"""Noise schedules and DDIM timestep sequences as ermongroup/ddim's runner computes them.

Betas are made in float64 by numpy and cast to float32 for sampling (`betas_from_config`), exactly as the
original runner does; the skip sequences reproduce its `uniform` and `quad` formulas, including their quirks
(quad tops out at 0.8 * T = 800 and repeats small values; uniform with T % steps != 0 yields more than `steps`
values).
"""
import numpy as np
import torch

from ldm.util import UserError

BETA_SCHEDULES = ("quad", "linear", "const", "jsd", "sigmoid")
SKIP_TYPES = ("uniform", "quad")


def get_beta_schedule(beta_schedule, *, beta_start, beta_end, num_diffusion_timesteps):
    """float64 numpy betas [T] of the named schedule."""
    n = int(num_diffusion_timesteps)
    if beta_schedule == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "const":
        betas = beta_end * np.ones(n, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    elif beta_schedule == "sigmoid":
        s = np.linspace(-6, 6, n)
        betas = 1.0 / (np.exp(-s) + 1) * (beta_end - beta_start) + beta_start
    else:
        raise UserError(f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    if betas.shape != (n,):
        raise ValueError(f"schedule has shape {betas.shape}, expected ({n},)")
    return betas


def betas_from_config(config, device=None):
    """float32 torch betas of config.diffusion (the original's torch.from_numpy(betas).float())."""
    d = config.diffusion
    betas = get_beta_schedule(d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end,
                              num_diffusion_timesteps=d.num_diffusion_timesteps)
    return torch.from_numpy(betas).float().to(device)


def timestep_sequence(skip_type, timesteps, num_diffusion_timesteps=1000):
    """The ascending list `seq` of DDIM timesteps the original's sample_image builds.

    uniform: range(0, T, T // steps); quad: int(s) for s in linspace(0, sqrt(0.8 T), steps) ** 2.
    """
    steps, total = int(timesteps), int(num_diffusion_timesteps)
    if steps < 1 or steps > total:
        raise UserError(f"the number of sampling steps must be between 1 and {total}, got {steps}")
    if skip_type == "uniform":
        return list(range(0, total, total // steps))
    if skip_type == "quad":
        return [int(s) for s in list(np.linspace(0, np.sqrt(total * 0.8), steps) ** 2)]
    raise UserError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)}")
