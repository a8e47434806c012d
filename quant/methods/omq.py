"""OMQ: outlier-driven mixed quantization (MPQ-DM.md §7). Pure functions over tensors; no layer classes.

Pieces: SmoothQuant factors (§7.1), per-channel Pearson kurtosis (§7.2), bit allocation for split m (§7.3),
candidate sets and the output-MSE search (§7.4), and the MPQ-DM+ allocation (§7.6).
"""
import torch

from quant.quantizer import fake_quant, init_max

SMOOTH_EPS = 1e-8


def smoothing_factors(x, weight, alpha=0.5, eps=SMOOTH_EPS):
    """s_j = max|X_j|^α / max|W_:,j|^(1-α) per input channel j (α = 0.5: sqrt of the ratio).

    x: conv input (N, Cin, H, W) or linear input (..., Cin); weight: (Cout, Cin, ...). Both maxima are clamped
    at eps so an all-zero column or channel cannot give inf/0 (a no-op whenever the unguarded value is finite).
    """
    x = x.detach()
    if weight.dim() == 4:
        x_max = x.abs().amax(dim=(0, 2, 3))
    else:
        x_max = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
    w_dims = tuple(d for d in range(weight.dim()) if d != 1)
    w_max = weight.detach().abs().amax(dim=w_dims)
    return x_max.clamp(min=eps).pow(alpha) / w_max.clamp(min=eps).pow(1.0 - alpha)


def kurtosis(weight):
    """Plain (Pearson) kurtosis per output channel: mean((w-μ)^4) / σ^4 with the unbiased (N-1) σ.

    A constant row (σ = 0) gets 0, i.e. it ranks as the least outlier-heavy channel.
    """
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    mu = w.mean(dim=1, keepdim=True)
    m4 = (w - mu).pow(4).mean(dim=1)
    var = w.var(dim=1, unbiased=True)
    k = m4 / var.pow(2)
    return torch.nan_to_num(k, nan=0.0, posinf=0.0).to(weight.dtype)


def _rank_desc(kappa):
    return torch.argsort(kappa, descending=True, stable=True)


def allocate(kappa, m, b):
    """Per-channel bits: m highest-κ channels b+1, m lowest-κ channels b-1, the rest b (average exactly b)."""
    cout = kappa.numel()
    if not 0 <= 2 * m <= cout:
        raise ValueError(f"split m={m} does not fit {cout} channels")
    order = _rank_desc(kappa)
    bits = torch.full((cout,), int(b), dtype=torch.int32, device=kappa.device)
    if m:
        bits[order[:m]] = b + 1
        bits[order[cout - m:]] = b - 1
    return bits


def allocate_plus(kappa, b):
    """MPQ-DM+: the top ⌊Cout/10⌋ κ channels get b+1, every other channel b (no b-1 group, no search)."""
    cout = kappa.numel()
    bits = torch.full((cout,), int(b), dtype=torch.int32, device=kappa.device)
    bits[_rank_desc(kappa)[: cout // 10]] = b + 1
    return bits


def candidates(cout, mode="paper"):
    """Split sizes searched: paper {0, g, .., 5g}, released {0, g}; g = Cout // 10; g = 0 gives {0}."""
    g = cout // 10
    if g == 0:
        return [0]
    if mode == "paper":
        return [i * g for i in range(6)]
    if mode == "released":
        return [0, g]
    raise ValueError(f"unknown OMQ candidate set {mode!r}")


@torch.no_grad()
def search(x, weight_smoothed, smooth_inv_x, fp_out, op, b, cand):
    """Pick m by output MSE (§7.4): ascending m, a candidate replaces the best only on strict improvement.

    x: the layer's real (upstream-quantized) input; smooth_inv_x: x/s; fp_out = op(x, W) (FP reference);
    op(x, w) the layer's conv/linear. Each candidate quantizes W·s with fresh per-channel `max`-init
    quantizers at the allocated bits (one pass; per-channel bits) and no activation quantizer.
    Returns (m, bits, errors list in candidate order).
    """
    kappa = kurtosis(weight_smoothed)
    best = None
    errors = []
    for m in cand:
        bits = allocate(kappa, m, b)
        delta, zero = init_max(weight_smoothed, bits, per_channel=True)
        view = (-1,) + (1,) * (weight_smoothed.dim() - 1)
        levels = torch.pow(2.0, bits.to(weight_smoothed.dtype)).view(view)
        w_hat = fake_quant(weight_smoothed, delta.view(view), zero.view(view), levels)
        err = (op(smooth_inv_x, w_hat) - fp_out).pow(2).mean().item()
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, m, bits)
    return best[1], best[2], errors
