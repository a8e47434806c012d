"""Diagonal Gaussian posterior of the KL autoencoder (moments = [mean | logvar] along channels)."""
import numpy as np
import torch


class DiagonalGaussianDistribution:
    def __init__(self, parameters, deterministic=False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        # clamp keeps exp() finite for untrained / extreme encoders, as the original does
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator=None, noise=None):
        """mean + std * eps; eps is `noise` if given, else drawn from `generator` (global RNG when None)."""
        if noise is None:
            # like the original, draw on the generator's device (the CPU for the global RNG), then move
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def kl(self, other=None):
        if self.deterministic:
            return torch.tensor([0.0], device=self.mean.device)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=dims)

    def nll(self, sample, dims=(1, 2, 3)):
        if self.deterministic:
            return torch.tensor([0.0], device=self.mean.device)
        logtwopi = np.log(2.0 * np.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

    def mode(self):
        return self.mean
