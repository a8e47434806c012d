"""Pixel-space DDPM of the DDIM paper (ermongroup/ddim), clean-room, with the original module paths.

`ddim.models.diffusion.Model` (state-dict keys of the official CIFAR-10 / CelebA / LSUN checkpoints),
`ddim.functions.denoising` (generalized_steps, ddpm_steps), `ddim.runners.diffusion` (beta schedules, skip
sequences), `ddim.datasets` (data transforms), `ddim.config` (YAML -> namespace), `ddim.checkpoint` (safe,
strict loading) and `ddim.pipeline.PixelDiffusion` (the LatentDiffusion-like surface the quantization
pipeline drives). No quantization code lives here.
"""
