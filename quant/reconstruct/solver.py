"""The reconstruction solver: Adam on a unit's trainables for N iterations over streamed (inputs, target) batches.

It knows nothing about the UNet (the gptq pattern): it gets the unit module, a batch iterator and an ``Objective``
(quant.reconstruct.objectives), which says what is trained (parameter groups with their lr schedules), the loss,
which cached inputs feed the unit (quantized / FP / mixed) and what is active around the iterations.
"""
import math
from types import SimpleNamespace

import torch

from quant.reconstruct.units import no_checkpointing


def lr_lambda(schedule, n_iters):
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":       # to 0 over n_iters (CosineAnnealingLR with eta_min = 0)
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, n_iters) / n_iters))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def solve(unit, module, fp_module, batches, objective, n_iters, device, generator=None, progress=None):
    """Optimise ``module`` (the quantized unit) for ``n_iters`` iterations; returns a log dict.

    batches yields dicts {"q": (args, kwargs) | None, "fp": (args, kwargs) | None, "target": tensor | tuple}
    (CPU); ``unit.run(module, args, kwargs)`` runs the unit. A unit without trainables is left as it is.
    """
    groups = objective.begin(module, n_iters)
    params = [p for g in groups for p in g["params"]]
    if not params or n_iters == 0:
        objective.end(module)
        return {"iterations": 0, "trainables": 0}
    optimizer = torch.optim.Adam([{"params": g["params"], "lr": g["lr"]} for g in groups])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lr_lambda(g.get("schedule", "constant"), n_iters) for g in groups])
    first = last = None
    with objective.active(module, fp_module), no_checkpointing(module), torch.enable_grad():
        for it, batch in zip(range(n_iters), batches):
            batch = _to(batch, device)
            args, kwargs = objective.unit_inputs(batch, generator)
            output = unit.run(module, args, kwargs)
            ctx = SimpleNamespace(unit=unit, module=module, fp_module=fp_module, batch=batch, args=args,
                                  kwargs=kwargs, output=output, count=it + 1, n_iters=n_iters, generator=generator)
            rec, extra = objective.loss(ctx)
            loss = rec + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            last = float(rec.detach())
            first = last if first is None else first
            if progress is not None:
                progress.update(1)
                if it % 50 == 0 or it + 1 == n_iters:
                    progress.set_postfix(rec=f"{last:.4g}", reg=f"{float(extra.detach()):.3g}")
    objective.end(module)
    return {"iterations": n_iters, "trainables": sum(p.numel() for p in params), "rec_first": first,
            "rec_last": last}
