"""The sampling-step index as ambient per-call state (MPQ-DM.md §3.2, "Step selection").

The index lives in a ContextVar set by ``step_scope(k)`` around one UNet call, never in a module counter.
``ldm.modules.diffusionmodules.util.checkpoint`` re-runs recomputation inside the context captured at forward
time, so a checkpointed block sees the same k during backward.

Repeated timesteps (TXT2IMG_CIFAR.md B.3): per-step quantizers are keyed by DISTINCT timestep value. A schedule that
repeats values (DDIM's quad-100 on CIFAR-10: 100 steps, 96 distinct values, 0 four times and 2 twice) gets one entry
per distinct value, in order of first appearance; every call at a value uses that value's entry, whichever step
makes it. This is right under every sampler: DDIM's identity steps (t == t_next) return x_t whatever the network
outputs, so their outputs never reach the sample and the real step at the same value sees the same input x_t; PLMS's
first step calls the network twice (at t and at t_next) and the look-ahead call at t_next uses t_next's entry, as the
next step's call does. TFMQ-DM instead indexes its per-step sets by a call counter (100 sets on CIFAR-10); the
difference is confined to the identity steps, whose outputs are discarded.
"""
import contextlib
import contextvars

import torch

from ldm.util import UserError

_STEP = contextvars.ContextVar("quant_sampling_step", default=None)


def current_step():
    """The step index of the enclosing step_scope, or None outside any scope."""
    return _STEP.get()


@contextlib.contextmanager
def step_scope(k):
    """Run the enclosed UNet call(s) with temporal quantizers reading entry k."""
    token = _STEP.set(None if k is None else int(k))
    try:
        yield
    finally:
        _STEP.reset(token)


class StepTable:
    """Maps a timestep value to its step index k: the position of the value among the schedule's distinct values
    (in order of first appearance; a schedule with repeats keeps one entry per value, see the module doc)."""

    def __init__(self, timesteps):
        values = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        self.timesteps = list(dict.fromkeys(values))
        self.repeats = len(values) - len(self.timesteps)  # calls that share an entry with an earlier step
        self._index = {t: k for k, t in enumerate(self.timesteps)}

    def __len__(self):
        return len(self.timesteps)

    def lookup(self, t):
        """k for a timestep tensor/int; all rows must share one t, and t must be in the table."""
        flat = torch.as_tensor(t).reshape(-1)
        if flat.numel() == 0:
            raise UserError("the UNet was called with an empty timestep tensor.")
        first = flat[0]
        if flat.numel() > 1 and not bool((flat == first).all()):
            raise UserError(f"all rows of a quantized UNet batch must share one timestep, got {sorted(set(flat.tolist()))}.")
        value = int(first.round().item()) if flat.is_floating_point() else int(first.item())
        if value not in self._index:
            raise UserError(f"timestep {value} is not in the quantized model's schedule {self.timesteps}; "
                            "sample with the schedule the model was calibrated for.")
        return self._index[value]
