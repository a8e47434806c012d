"""Data transforms between images in [0, 1] and the model's space (ermongroup/ddim datasets/__init__.py).

With `config.data.rescaled` (the CIFAR-10 config) that space is [-1, 1]: X -> 2X - 1 and back with a clamp.
The dequantization options draw noise; pass a torch.Generator to make them reproducible.
"""
import torch


def logit_transform(image, lam=1e-6):
    image = lam + (1 - 2 * lam) * image
    return torch.log(image) - torch.log1p(-image)


def _noise_like(x, kind, generator):
    if generator is None:
        return torch.rand_like(x) if kind == "uniform" else torch.randn_like(x)
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def data_transform(config, X, generator=None):
    """Images in [0, 1] -> model space (dequantization, then rescaling or logit, then mean removal)."""
    if config.data.uniform_dequantization:
        X = X / 256.0 * 255.0 + _noise_like(X, "uniform", generator) / 256.0
    if config.data.gaussian_dequantization:
        X = X + _noise_like(X, "normal", generator) * 0.01
    if config.data.rescaled:
        X = 2 * X - 1.0
    elif config.data.logit_transform:
        X = logit_transform(X)
    if hasattr(config, "image_mean"):
        return X - config.image_mean.to(X.device)[None, ...]
    return X


def inverse_data_transform(config, X):
    """Model space -> images clamped to [0, 1]."""
    if hasattr(config, "image_mean"):
        X = X + config.image_mean.to(X.device)[None, ...]
    if config.data.logit_transform:
        X = torch.sigmoid(X)
    elif config.data.rescaled:
        X = (X + 1.0) / 2.0
    return torch.clamp(X, 0.0, 1.0)
