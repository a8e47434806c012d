"""Activation-quantizer initialisation for post-training quantization (PEERS.md §1.1, §1.4).

``init_act_quantizers``: one sequential forward with weights and activations quantized; each activation quantizer
(layer inputs, split halves, attention-matmul inputs) calibrates itself on its real input the first time it is
reached (``mse`` or ``max``, as built by the policy), so downstream quantizers see quantized upstream activations.
``running_stats``: then an EMA (momentum 0.95) of each quantizer's input min/max over all calibration rows in
batches, seeded with the init batch's range; (Δ, z) are recomputed from the EMA range after every batch (min-max),
so later layers see the updated upstream quantizers, as in Q-Diffusion. Hooks sit on the quantizer modules and are
removed on exit; nothing is created lazily. ``search_ema_init`` is EDA-DM's: per batch, each quantizer's range-search
range is EMA-combined (0.9) and its (Δ, z) follow at once.
"""
import contextlib

import torch

from quant.layers import QuantLayer, QuantMatMul, quant_state
from quant.step import step_scope


def _act_quantizers(model):
    out = []
    for m in model.modules():
        if isinstance(m, (QuantLayer, QuantMatMul)):
            out += m.act_quantizers()
    return out


@contextlib.contextmanager
def _pre_hooks(quantizers, fn):
    handles = [q.register_forward_pre_hook(lambda mod, args: fn(mod, args[0])) for q in quantizers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model, rows, idx, device):
    args, kwargs = rows.call_args(idx, device)
    with step_scope(None):
        model(*args, **kwargs)


@torch.no_grad()
def init_act_quantizers(model, rows, n_samples, seed, device):
    """Calibrate every activation quantizer on ``n_samples`` random rows; returns {quantizer: (min, max)} of the
    inputs each one saw (the seed of running statistics)."""
    quantizers = _act_quantizers(model)
    seen = {}

    def first_reach(q, x):
        if q not in seen:
            q.calibrate(x)
            seen[q] = (x.detach().min(), x.detach().max())

    idx = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_samples]
    with quant_state(model, act=True), _pre_hooks(quantizers, first_reach):
        _run(model, rows, idx, device)
    missing = [q for q in quantizers if q not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} activation quantizers were not reached by the calibration forward")
    return seen


@torch.no_grad()
def running_stats(model, rows, ranges, batch_size, momentum, seed, device):
    """EMA of every activation quantizer's input range over all rows (batches of ``batch_size``), Δ/z by min-max."""
    state = {q: (lo.clone(), hi.clone()) for q, (lo, hi) in ranges.items()}

    def update(q, x):
        lo, hi = state[q]
        lo.mul_(momentum).add_(x.detach().min() * (1 - momentum))
        hi.mul_(momentum).add_(x.detach().max() * (1 - momentum))
        q.set_range(lo, hi)

    with quant_state(model, act=True), _pre_hooks(list(state), update):
        for idx in rows.micro_batches(batch_size, seed):
            _run(model, rows, idx, device)
    return state


@torch.no_grad()
def search_ema_init(model, rows, batch_size, momentum, seed, device):
    """EDA-DM's activation init (PEERS.md §2.2): per batch of ``batch_size`` rows (all rows, one seeded pass), each
    quantizer's range from the range search on its input is EMA-combined, running = momentum·running +
    (1 - momentum)·batch (the first batch sets it), and (Δ, z) follow from the running range at once, so later
    quantizers see the updated upstream ones. Returns {quantizer: (lo, hi)}."""
    from quant.activation import SoftmaxQuantizer
    from quant.quantizer import search_qparams, search_range

    quantizers = _act_quantizers(model)
    state = {}

    def update(q, x):
        lo, hi = search_range(x, q.n_bits)
        if q in state:
            lo = momentum * state[q][0] + (1 - momentum) * lo
            hi = momentum * state[q][1] + (1 - momentum) * hi
        state[q] = (lo, hi)
        if isinstance(q, SoftmaxQuantizer):
            q.set_range(0.0, hi)
        else:
            delta, zero = search_qparams(lo, hi, q.n_bits)
            q.delta.copy_(delta)
            q.zero.copy_(zero)

    with quant_state(model, act=True), _pre_hooks(quantizers, update):
        for idx in rows.micro_batches(batch_size, seed):
            _run(model, rows, idx, device)
    missing = [q for q in quantizers if q not in state]
    if missing:
        raise RuntimeError(f"{len(missing)} activation quantizers were not reached by the calibration forwards")
    return state
