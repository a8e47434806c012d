"""The sampling-step index as ambient per-call state (MPQ-DM.md §3.2, "Step selection").

The index lives in a ContextVar set by ``step_scope(k)`` around one UNet call, never in a module counter.
``ldm.modules.diffusionmodules.util.checkpoint`` re-runs recomputation inside the context captured at forward
time, so a checkpointed block sees the same k during backward.
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
    """Maps a timestep value to its sampling-step index k (position in the schedule list)."""

    def __init__(self, timesteps):
        values = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        if len(set(values)) != len(values):
            raise UserError(f"the timestep schedule {values} has repeated values.")
        self.timesteps = values
        self._index = {t: k for k, t in enumerate(values)}

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
