"""Uniform affine fake quantization (MPQ-DM.md §3.1, PEERS.md §1.1) and its scale initialisers.

Conventions used throughout quant/:
- ``n_levels`` is the number of integer levels, 2**bits; the integer grid is 0..n_levels-1. It may be a python
  int or a tensor that broadcasts against ``x`` (per-channel bit widths: one pass over a mixed-precision weight).
- The zero point ``zero`` is a float. It is initialised to an integer but never rounded in the forward, so
  after training it is a free offset.
- Per-channel means "per slice along dim 0"; a per-channel initialiser runs the per-tensor procedure on each
  slice independently (vectorised, not looped).
- A symmetric quantizer (Q-Diffusion's option: L' = 2^(b-1) - 1, clamp [-L'-1, L'] with z = 0) is the same affine
  grid with z fixed at 2^(b-1): clamp(round(x/Δ) + 2^(b-1), 0, 2^b - 1) - 2^(b-1) = clamp(round(x/Δ), -L'-1, L'),
  so fake_quant, its gradients and the packed export need no second code path.
"""
import torch

MSE_CANDIDATES = 80      # shrink steps of the mse search
MSE_SHRINK = 0.01        # 1 % per step
MSE_P = 2.4              # LAPQ-style Lp norm
DELTA_FLOOR = 1e-8


def round_ste(x):
    """round() in the forward, identity in the backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _sum_to(grad, shape):
    """Sum a broadcast gradient back to the shape of the operand it belongs to."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.reshape(shape)


def _reduce_mul(a, b, shape):
    """sum of a*b reduced to `shape` (a dot product when the target is a scalar)."""
    if len(shape) == 0 or all(n == 1 for n in shape):
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    return _sum_to(a * b, shape)


class _FakeQuant(torch.autograd.Function):
    """Fused fake quantization. Its gradients are exactly those of the spec's formulation

        v = round_ste(x/Δ) + z;  v_c = v + relu(0 - v) - relu(v - hi);  x̂ = (v_c - z)·Δ

    written out by hand, so autograd does not record ~12 elementwise nodes over a whole weight tensor:
        inside (0 <= v <= hi): dx̂/dx = 1, dx̂/dΔ = round(x/Δ) - x/Δ, dx̂/dz = 0
        above (v > hi):        dx̂/dx = 0, dx̂/dΔ = hi - z,              dx̂/dz = -Δ
        below (v < 0):         dx̂/dx = 0, dx̂/dΔ = -z,                  dx̂/dz = -Δ
    (relu'(0) = 0, so the boundary points count as inside, as in the autograd version.)
    In every case dx̂/dΔ = (x̂ - x·[inside])/Δ, so the backward needs only x, x̂ and the inside mask:
        ∂Δ = (Σ g·x̂ - Σ g_in·x)/Δ,  ∂z = -Δ·(Σ g - Σ g_in),  ∂x = g_in,  with g_in = g·[inside].
    """

    @staticmethod
    def forward(ctx, x, delta, zero, hi):
        v = torch.div(x, delta).round_().add_(zero)
        inside = (v >= 0).logical_and_(v <= hi)
        out = torch.minimum(v.clamp_(min=0.0), hi, out=v).sub_(zero).mul_(delta)
        ctx.save_for_backward(x, out, inside, delta)
        ctx.shapes = (delta.shape, zero.shape)
        return out

    @staticmethod
    def backward(ctx, g):
        x, out, inside, delta = ctx.saved_tensors
        d_shape, z_shape = ctx.shapes
        g_in = g * inside
        grad_x = grad_delta = grad_zero = None
        if ctx.needs_input_grad[0]:
            grad_x = g_in
        if ctx.needs_input_grad[1]:
            grad_delta = (_reduce_mul(g, out, d_shape) - _reduce_mul(g_in, x, d_shape)) / delta.reshape(d_shape)
        if ctx.needs_input_grad[2]:
            grad_zero = -delta.reshape(z_shape) * (_sum_to(g, z_shape) - _sum_to(g_in, z_shape))
        return grad_x, grad_delta, grad_zero, None


def _fake_quant_nograd(x, delta, zero, hi):
    """Forward only: one allocation, the rest in place (the sampling path runs this on every activation)."""
    out = torch.div(x, delta).round_().add_(zero)
    if isinstance(hi, torch.Tensor):
        out = torch.minimum(out.clamp_(min=0.0), hi, out=out)
    else:
        out = out.clamp_(0.0, hi)
    return out.sub_(zero).mul_(delta)


def fake_quant(x, delta, zero, n_levels):
    """x̂ = (clip(round_ste(x/Δ) + z, 0, n_levels-1) - z)·Δ with gradients to x (inside the range), Δ and z."""
    hi = n_levels - 1
    if torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad or zero.requires_grad):
        if not isinstance(hi, torch.Tensor):
            hi = torch.tensor(float(hi), dtype=x.dtype, device=x.device)
        return _FakeQuant.apply(x, delta, zero, hi)
    return _fake_quant_nograd(x, delta, zero, hi)


def fake_quant_autograd(x, delta, zero, n_levels):
    """The spec's formulation spelled out with autograd ops; the reference the fused version is tested against."""
    hi = torch.as_tensor(n_levels, dtype=x.dtype, device=x.device) - 1
    v = round_ste(x / delta) + zero
    v = v + torch.relu(0 - v) - torch.relu(v - hi)
    return (v - zero) * delta


def _levels_col(n_bits, rows, like):
    """Per-row number of levels as a (rows, 1) tensor from an int or a (rows,) tensor of bit widths."""
    bits = torch.as_tensor(n_bits, device=like.device)
    levels = (2 ** bits.to(torch.int64)).to(like.dtype)
    return levels.expand(rows).reshape(rows, 1) if levels.dim() == 0 else levels.reshape(rows, 1)


def _rows(x, per_channel):
    return x.detach().reshape(x.shape[0], -1) if per_channel else x.detach().reshape(1, -1)


def _shape_out(v, x, per_channel):
    return v.reshape(x.shape[0]) if per_channel else v.reshape(())


def init_max(x, n_bits, per_channel=False, symmetric=False):
    """`max` init: range widened to include 0; Δ = (max - min)/(2^n - 1) floored at 1e-8, z = round(-min/Δ).

    Symmetric: Δ = max|x|/L' with L' = 2^(n-1) - 1, z = 2^(n-1) (the signed grid, see ``symmetric_zero``).
    Returns (delta, zero): scalars, or (C,) tensors when per_channel (C = x.shape[0]); n_bits may be (C,).
    """
    rows = _rows(x, per_channel)
    hi = _levels_col(n_bits, rows.shape[0], rows) - 1
    x_min = rows.amin(dim=1, keepdim=True).clamp(max=0)
    x_max = rows.amax(dim=1, keepdim=True).clamp(min=0)
    if symmetric:
        half = (hi + 1) / 2
        if bool((half - 1 < 1).any()):
            raise ValueError("a symmetric quantizer needs at least 2 bits")
        delta = (torch.maximum(-x_min, x_max) / (half - 1)).clamp(min=DELTA_FLOOR)
        zero = half.expand_as(delta)
    else:
        delta = ((x_max - x_min) / hi).clamp(min=DELTA_FLOOR)
        zero = torch.round(-x_min / delta)
    return _shape_out(delta, x, per_channel), _shape_out(zero, x, per_channel)


def init_mse(x, n_bits, per_channel=False, symmetric=False):
    """`mse` init: 80 shrinking candidate ranges, keep the one minimising mean |x - x̂|^2.4 (first minimum wins).

    The range is the raw min/max (not widened to include 0), the candidates quantise with a plain clamp, and
    each channel (row) chooses independently. Δ is floored at 1e-8 so a constant slice does not divide by zero.
    Symmetric (Q-Diffusion's option): the candidate Δ keeps the 2^n - 1 denominator (PEERS.md §1.1), z is fixed at
    2^(n-1) and each candidate is scored on that signed grid, the one the forward uses [T: the released search
    scores on a different, unsigned grid; no published recipe combines `mse` with symmetric activations].
    """
    rows = _rows(x, per_channel)
    hi = _levels_col(n_bits, rows.shape[0], rows) - 1
    x_min = rows.amin(dim=1, keepdim=True)
    x_max = rows.amax(dim=1, keepdim=True)
    best_score = torch.full_like(x_min, float("inf"))
    best_delta = torch.ones_like(x_min)
    best_zero = torch.zeros_like(x_min)
    zero_t = torch.zeros((), dtype=rows.dtype, device=rows.device)
    sym_zero = ((hi + 1) / 2).expand_as(x_min) if symmetric else None
    for i in range(MSE_CANDIDATES):
        shrink = 1.0 - MSE_SHRINK * i
        lo, up = x_min * shrink, x_max * shrink
        delta = ((up - lo) / hi).clamp(min=DELTA_FLOOR)
        zero = sym_zero if symmetric else torch.round(-lo / delta)
        q = torch.round(rows / delta).add_(zero).clamp_(min=zero_t, max=hi).sub_(zero).mul_(delta)
        score = q.sub_(rows).abs_().pow_(MSE_P).mean(dim=1, keepdim=True)
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_delta = torch.where(better, delta, best_delta)
        best_zero = torch.where(better, zero, best_zero)
    return _shape_out(best_delta, x, per_channel), _shape_out(best_zero, x, per_channel)


SEARCH_CANDIDATES = 100  # thresholds of EDA-DM's range search


def search_range(x, n_bits, per_channel=False):
    """EDA-DM's (QDrop-style) "symmetric" range search (PEERS.md §2.2): thresholds thr_i = i·max(|min|, max)/100,
    i = 1..100, on the range [0, thr] for a one-sided slice (min >= 0) and [-thr, thr] otherwise; each candidate is
    scored by mean |x - x̂|^2.4 on its grid Δ = (hi - lo)/(2^n - 1), z = clamp(-round(lo/Δ), 0, 2^n - 1), the first
    minimum wins. Only the search is symmetric: the grid stays affine. Returns (lo, hi): scalars, or (C,) per
    channel; n_bits may be (C,). [T: the released asymmetric 2-D search (range size x zero-point shift) is not
    built; every EDA-DM recipe uses the symmetric one.]"""
    rows = _rows(x, per_channel)
    hi_level = _levels_col(n_bits, rows.shape[0], rows) - 1
    x_min, x_max = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    one_sided = x_min >= 0
    top = torch.maximum(x_min.abs(), x_max)
    best_score = torch.full_like(x_min, float("inf"))
    best_lo, best_hi = torch.zeros_like(x_min), top.clone()
    zero_t = torch.zeros((), dtype=rows.dtype, device=rows.device)
    for i in range(1, SEARCH_CANDIDATES + 1):
        thr = top * (i / SEARCH_CANDIDATES)
        lo = torch.where(one_sided, torch.zeros_like(thr), -thr)
        delta = ((thr - lo) / hi_level).clamp(min=DELTA_FLOOR)
        zero = torch.minimum(torch.round(-lo / delta).clamp(min=0), hi_level)
        q = torch.round(rows / delta).add_(zero).clamp_(min=zero_t, max=hi_level).sub_(zero).mul_(delta)
        score = q.sub_(rows).abs_().pow_(MSE_P).mean(dim=1, keepdim=True)
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, thr, best_hi)
    return _shape_out(best_lo, x, per_channel), _shape_out(best_hi, x, per_channel)


def search_qparams(lo, hi_value, n_bits):
    """(Δ, z) of EDA-DM's grid on a range [lo, hi]: Δ = (hi - lo)/(2^n - 1) (floored at 1e-8),
    z = clamp(-round(lo/Δ), 0, 2^n - 1); lo, hi and n_bits broadcast (per channel or scalars)."""
    hi_level = torch.as_tensor(2.0, dtype=torch.float32).pow(torch.as_tensor(n_bits, dtype=torch.float32)) - 1
    lo, hi_value = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi_value, dtype=torch.float32)
    hi_level = hi_level.to(lo.device)
    delta = ((hi_value - lo) / hi_level).clamp(min=DELTA_FLOOR)
    return delta, torch.minimum(torch.round(-lo / delta).clamp(min=0), hi_level)


def init_search(x, n_bits, per_channel=False):
    """`search` init (EDA-DM's weights, and one batch of its activations): (Δ, z) of ``search_range``."""
    lo, hi_value = search_range(x, n_bits, per_channel)
    return search_qparams(lo, hi_value, n_bits)


def range_qparams(lo, hi_value, n_bits, symmetric=False, unsigned=False):
    """(Δ, z) of a per-tensor quantizer from a tracked range [lo, hi] (running statistics, PEERS.md §1.1):
    asymmetric Δ = (hi - lo)/(2^n - 1), z = round(-lo/Δ); symmetric Δ = max(|lo|, |hi|)/L', z = 2^(n-1);
    unsigned (softmax) Δ = hi/(2^n - 1), z = 0. Δ is floored at 1e-8."""
    lo, hi_value = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi_value, dtype=torch.float32)
    levels = 2.0 ** int(n_bits)
    if unsigned:
        delta = (hi_value / (levels - 1)).clamp(min=DELTA_FLOOR)
        return delta, torch.zeros_like(delta)
    if symmetric:
        delta = (torch.maximum(lo.abs(), hi_value.abs()) / (levels / 2 - 1)).clamp(min=DELTA_FLOOR)
        return delta, torch.full_like(delta, levels / 2)
    delta = ((hi_value - lo) / (levels - 1)).clamp(min=DELTA_FLOOR)
    return delta, torch.round(-lo / delta)


def quantize_int(x, delta, zero, n_levels):
    """Integer codes clamp(round(x/Δ) + z, 0, n_levels-1) (z rounded first, for export and stored int weights)."""
    hi = torch.as_tensor(n_levels, dtype=x.dtype, device=x.device) - 1
    q = torch.round(x / delta) + torch.round(zero)
    return torch.clamp(q, min=torch.zeros((), dtype=x.dtype, device=x.device), max=hi)
