"""TFMQ-DM's Finite Set Calibration (PEERS.md §3.2): one activation parameter set per sampling step.

Estimator, for every set: the quantizer's own init (MSE by default; the unsigned max for softmax inputs) at the
first reach of one forward on ``init_n`` random rows, then an EMA (momentum 0.95) of the input min/max over all of
the set's rows in batches, (Δ, z) recomputed by min-max after every batch; the EMA starts from the init batch's range.

Sets: a per-step quantizer (TemporalActQuantizer) gets entry k from the rows of step k alone, k being the timestep
value's position in the model's StepTable, so a step's calibration starts afresh; every other quantizer gets one
set from the pooled rows of all steps. ``calibrate_sets`` runs the per-step quantizers first, step by step, then the
one-set quantizers with the per-step sets in place. While the per-step sets are calibrated only the layers holding
them quantize their inputs: in the `paper` variant these are the TIB's, whose inputs depend on t alone, so the
uncalibrated rest cannot reach them; in the `released` variant that is every layer. A per-step set is chosen per
UNet call, so when a model has them the pooled batches hold one timestep each: every step's rows in batches, the
batches in seeded random order [T]. Rows at a timestep the table lacks are not used by such a model, and a table
timestep without rows is a UserError (the sets are keyed by the schedule the model samples with).
"""
import contextlib

import torch

from ldm.util import UserError
from quant.activation import SoftmaxQuantizer, TemporalActQuantizer, TemporalSoftmaxQuantizer
from quant.calib_select import select_calibration
from quant.layers import QuantLayer, QuantMatMul
from quant.quantizer import init_max, init_mse, range_qparams
from quant.reconstruct.driver import CalibrationRows
from quant.step import step_scope


def fsc_rows(calib, n_samples):
    """Every recorded step of a loaded calib.pt, the first ``n_samples`` trajectories at each (x2 rows with
    guidance): FSC uses all steps, whatever the weight stage selects."""
    meta = calib["meta"]
    n_steps = int(meta.get("n_entries", 1)) // max(int(meta.get("calib_batches", 1)), 1)
    recorded = int(meta.get("calib_batch", 0)) * int(meta.get("calib_batches", 0))
    if recorded and not 1 <= n_samples <= recorded:
        raise UserError(f"fsc_n must be between 1 and the {recorded} recorded trajectories, got {n_samples}; record "
                        "more with quant_scripts/01_collect_input_4_calib.py --calib_batch/--calib_batches.")
    rows = select_calibration(calib, max(n_steps, 1), n_samples)
    return CalibrationRows(rows["x"], rows["t"], rows["context"])


def step_indices(t, table):
    """k of each row's timestep in the StepTable, -1 where the table lacks it."""
    index = {value: k for k, value in enumerate(table.timesteps)}
    return torch.tensor([index.get(int(v), -1) for v in t.reshape(-1).tolist()], dtype=torch.long)


def check_coverage(t, table):
    """Per-step sets need rows at every timestep of the schedule they are keyed by (a UserError otherwise)."""
    ks = step_indices(t, table)
    missing = [value for k, value in enumerate(table.timesteps) if not bool((ks == k).any())]
    if missing:
        raise UserError(f"the calibration data has no rows at timestep {missing[0]} of the {len(table)}-step "
                        "schedule the per-step activation sets are keyed by; record calib.pt on the sampling "
                        "schedule (quant_scripts/01_collect_input_4_calib.py --calib_steps, --calib_data "
                        "fresh_per_step for TFMQ-DM's data).")


def _owners(model):
    return [m for m in model.modules() if isinstance(m, (QuantLayer, QuantMatMul))]


@contextlib.contextmanager
def _act_only(model, owners):
    """Activation quantization on for ``owners`` only (the previous switches restored on exit)."""
    mods, keep = _owners(model), {id(m) for m in owners}
    before = [m.act_enabled for m in mods]
    try:
        for m in mods:
            m.act_enabled = id(m) in keep
        yield
    finally:
        for m, was in zip(mods, before):
            m.act_enabled = was


def _init_qparams(q, x):
    if isinstance(q, (SoftmaxQuantizer, TemporalSoftmaxQuantizer)):
        return range_qparams(0.0, x.max(), q.n_bits, unsigned=True)
    init = init_mse if q.scale_method == "mse" else init_max
    return init(x, q.n_bits, symmetric=q.symmetric)


def _write(q, delta, zero, k):
    if isinstance(q, TemporalActQuantizer):
        q.delta[k] = delta.reshape(())
        q.zero[k] = zero.reshape(())
    else:
        q.delta.copy_(delta.reshape(()))
        q.zero.copy_(zero.reshape(()))


def _set_range(q, lo, hi, k):
    if isinstance(q, TemporalActQuantizer):
        q.set_range(lo, hi, k)
    else:
        q.set_range(lo, hi)


@torch.no_grad()
def estimate(model, rows, init_idx, batches, quantizers, momentum, device, step_of):
    """One set for each quantizer of ``quantizers`` (entry step_of(idx) of a per-step one): init at first reach on
    the rows ``init_idx``, then the EMA over ``batches`` (lists of row indices). Returns {quantizer: (lo, hi)}."""
    targets, seen, state, current = set(quantizers), {}, {}, [None]

    def first_reach(q, args):
        if q in targets and q not in seen:
            x = args[0].detach()
            _write(q, *_init_qparams(q, x), current[0])
            seen[q] = (x.min().clone(), x.max().clone())

    def update(q, args):
        if q in state:
            x, (lo, hi) = args[0].detach(), state[q]
            lo.mul_(momentum).add_(x.min() * (1 - momentum))
            hi.mul_(momentum).add_(x.max() * (1 - momentum))
            _set_range(q, lo, hi, current[0])

    def run(hook, idx):
        current[0] = step_of(idx)
        handles = [q.register_forward_pre_hook(hook) for q in targets]
        try:
            args, kwargs = rows.call_args(idx, device)
            with step_scope(current[0]):
                model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    run(first_reach, init_idx)
    if len(seen) != len(targets):
        raise RuntimeError(f"{len(targets) - len(seen)} activation quantizers were not reached by the FSC forward")
    state.update({q: (lo.clone(), hi.clone()) for q, (lo, hi) in seen.items()})
    for idx in batches:
        run(update, idx)
    return state


def _generator(seed, k=0):
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(k)) % (2 ** 62))


@torch.no_grad()
def calibrate_sets(model, rows, table, init_n, batch_size, momentum, seed, device):
    """Calibrate every activation quantizer of ``model`` (the bare quantized UNet, weights final) on ``rows``
    (CalibrationRows): per-step quantizers one entry per table step, the rest one set. Returns a small log."""
    owners = _owners(model)
    temporal = [q for m in owners for q in m.act_quantizers() if isinstance(q, TemporalActQuantizer)]
    shared = [q for m in owners for q in m.act_quantizers() if not isinstance(q, TemporalActQuantizer)]
    ks = step_indices(rows.t, table)
    log = {"per_step_quantizers": len(temporal), "one_set_quantizers": len(shared), "rows": len(rows)}
    if temporal:
        check_coverage(rows.t, table)
        holders = [m for m in owners if any(isinstance(q, TemporalActQuantizer) for q in m.act_quantizers())]
        with _act_only(model, holders):
            for k in range(len(table)):
                idx = torch.nonzero(ks == k).flatten()
                idx = idx[torch.randperm(len(idx), generator=_generator(seed, k))]
                estimate(model, rows, idx[:init_n], list(idx.split(batch_size)), temporal, momentum, device,
                         lambda _idx, k=k: k)
        for q in temporal:
            q.make_temporal()
    if shared:
        if temporal:      # one timestep per batch: every step's rows in batches, the batches shuffled
            batches = []
            for k in range(len(table)):
                idx = torch.nonzero(ks == k).flatten()
                batches += list(idx[torch.randperm(len(idx), generator=_generator(seed, k))].split(batch_size))
            order = torch.randperm(len(batches), generator=_generator(seed, len(table)))
            batches = [batches[int(i)] for i in order]
            init_idx = batches[0][:init_n]
            step_of = lambda idx: int(ks[idx[0]])  # noqa: E731
        else:
            batches = rows.micro_batches(batch_size, seed)
            init_idx = torch.randperm(len(rows), generator=_generator(seed))[:init_n]
            step_of = lambda idx: None  # noqa: E731
        with _act_only(model, owners):
            estimate(model, rows, init_idx, batches, shared, momentum, device, step_of)
    return log
