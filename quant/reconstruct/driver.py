"""The streaming driver: walks the units in forward-execution order and reconstructs each (PEERS.md §1.3).

For every unit not yet finished: run the calibration rows through the models in micro-batches, stopping each
forward as soon as the unit's inputs are captured (a forward pre-hook raises), so no micro-batch ever goes past
the unit. Inputs come from the partially quantized model (every earlier unit already reconstructed) and/or the FP
model, as the objective asks; the target is the FP unit applied to the FP inputs. The rows go into a bounded
``UnitCache`` (CPU, spilling to disk), the solver optimises the unit on batches streamed from it, the cache is
dropped and the unit's tensors are committed to the run's ``ReconState``. Only one unit's data exists at a time.
"""
import zlib

import torch

from quant.reconstruct.cache import UnitCache
from quant.reconstruct.solver import solve
from quant.layers import quant_state
from quant.step import step_scope


class _StopForward(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


# ------------------------------------------------------------------------------------------- calibration rows
class CalibrationRows:
    """The calibration tuples (x [N,...], t [N], context [N,...] or None) and how a model is called on them."""

    def __init__(self, x, t, context=None):
        self.x, self.t, self.context = x, t, context

    def __len__(self):
        return int(self.t.shape[0])

    def call_args(self, idx, device):
        kwargs = {} if self.context is None else {"context": self.context[idx].to(device)}
        return (self.x[idx].to(device), self.t[idx].to(device)), kwargs

    def micro_batches(self, size, seed):
        """Row indices in micro-batches of ``size`` from one seeded permutation (each batch a random subset)."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return [perm[i:i + size] for i in range(0, len(self), size)]


# ------------------------------------------------------------------------------------------------- capture
@torch.no_grad()
def capture_inputs(model, hook_name, call):
    """(args, kwargs) that the submodule ``hook_name`` ("" = the model) receives when ``model`` runs on ``call``."""
    target = model.get_submodule(hook_name) if hook_name else model
    store = {}

    def hook(_module, args, kwargs):
        store["inputs"] = (args, kwargs)
        raise _StopForward

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with step_scope(None):
            model(*call[0], **call[1])
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "inputs" not in store:
        raise RuntimeError(f"the forward never reached {hook_name!r}")
    return store["inputs"]


def flatten(prefix, value, out):
    """Tensors of a nested (args, kwargs) / tuple value into ``out`` under dotted keys; returns the skeleton
    (the same structure with keys in place of tensors; other leaves (None, numbers) kept as they are)."""
    if isinstance(value, torch.Tensor):
        out[prefix] = value
        return {"tensor": prefix}
    if isinstance(value, (tuple, list)):
        return {"seq": [flatten(f"{prefix}.{i}", v, out) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        return {"map": {k: flatten(f"{prefix}.{k}", v, out) for k, v in value.items()}}
    return {"value": value}


def unflatten(skeleton, tensors):
    if "tensor" in skeleton:
        return tensors[skeleton["tensor"]]
    if "seq" in skeleton:
        return tuple(unflatten(s, tensors) for s in skeleton["seq"])
    if "map" in skeleton:
        return {k: unflatten(s, tensors) for k, s in skeleton["map"].items()}
    return skeleton["value"]


def _as_call(inputs):
    args, kwargs = inputs
    return tuple(args), dict(kwargs)


# -------------------------------------------------------------------------------------------------- driver
class StageOptions:
    """Per-stage numbers: iterations, batch size, micro-batch size, cache budget/dir/dtype, seed, device."""

    def __init__(self, iters, batch_size, micro_batch, budget_bytes, cache_dir, seed, device, cache_dtype=None):
        self.iters, self.batch_size, self.micro_batch = int(iters), int(batch_size), int(micro_batch)
        self.budget_bytes, self.cache_dir, self.seed, self.device = budget_bytes, cache_dir, int(seed), device
        self.cache_dtype = cache_dtype


def collect(unit, qmodel, fpmodel, objective, rows, opts, cache):
    """Fill ``cache`` with the unit's rows; returns the skeleton that turns cached tensors back into a batch."""
    fp_module = unit.module(fpmodel)
    skeleton = None
    with quant_state(qmodel, act=objective.inputs_act_quant):
        for idx in rows.micro_batches(opts.micro_batch, opts.seed):
            call = rows.call_args(idx, opts.device)
            flat, parts = {}, {}
            if "q" in objective.needs:
                parts["q"] = flatten("q", unit.inputs(*capture_inputs(qmodel, unit.hook_name, call)), flat)
            fp_in = unit.inputs(*capture_inputs(fpmodel, unit.hook_name, call))
            if "fp" in objective.needs:
                parts["fp"] = flatten("fp", fp_in, flat)
            with torch.no_grad():
                target = unit.run(fp_module, *_as_call(fp_in))
            parts["target"] = flatten("y", target, flat)
            skeleton = skeleton or parts
            cache.add(flat)
    return skeleton


def _batches(cache, skeleton, opts, generator):
    for flat in cache.batches(opts.iters, opts.batch_size, generator):
        yield {k: (_as_call(unflatten(s, flat)) if k in ("q", "fp") else unflatten(s, flat))
               for k, s in skeleton.items()}


def unit_seed(seed, stage, name):
    """A seed per (stage, unit), independent of which units ran before: a resumed run draws the same batches."""
    return (seed * 1_000_003 + zlib.crc32(f"{stage}:{name}".encode())) % (2 ** 62)


def run_stage(stage, units, qmodel, fpmodel, objective_for, rows, opts, state, progress=False, log=None):
    """Reconstruct every unit of ``units`` not yet recorded in ``state`` for ``stage``; returns {unit: log}.

    objective_for(unit) -> Objective or None (skip). qmodel / fpmodel are the bare UNets (quantized / FP)."""
    from tqdm.auto import tqdm

    log = {} if log is None else log
    bar = tqdm(units, desc=f"reconstruct ({stage})", unit="unit", disable=not progress)
    for unit in bar:
        bar.set_postfix_str(unit.name or unit.kind)
        if state.is_done(stage, unit.name):
            continue
        objective = objective_for(unit)
        module = unit.module(qmodel)
        if objective is None or not objective.applies(module):
            state.commit(stage, unit.name, {})
            continue
        if opts.iters == 0:      # nothing to optimise: e.g. AdaRound's hard rounding of its init (= nearest)
            log[unit.name] = solve(unit, module, None, iter(()), objective, 0, opts.device)
            state.commit(stage, unit.name, module.state_dict())
            continue
        cache = UnitCache(opts.budget_bytes, opts.cache_dir, opts.cache_dtype)
        try:
            skeleton = collect(unit, qmodel, fpmodel, objective, rows, opts, cache)
            generator = torch.Generator().manual_seed(unit_seed(opts.seed, stage, unit.name))
            inner = tqdm(total=opts.iters, desc=unit.name, leave=False, disable=not progress)
            with inner:
                log[unit.name] = solve(unit, module, unit.module(fpmodel), _batches(cache, skeleton, opts, generator),
                                       objective, opts.iters, opts.device, generator, inner)
            log[unit.name].update(rows=cache.rows, spilled=cache.spilled, cache_peak_mb=cache.peak_bytes / 2 ** 20)
        finally:
            cache.close()
        state.commit(stage, unit.name, module.state_dict())
    return log
