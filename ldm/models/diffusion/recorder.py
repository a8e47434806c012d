"""Records the denoising UNet's inputs during sampling (calibration data), through a forward pre-hook.

One entry per UNet evaluation of a sampling step: {"x": [N,...] float CPU, "t": [N] long CPU, "context": tensor
or None}. A sampler that evaluates uncond and cond in two calls gives two calls with the same t and the same x
(classifier-free guidance evaluates both branches at one x_t); such a pair is merged into one entry, uncond rows
first, so the entries look like those of the batched [uncond; cond] call. Calls at the same t with a different
x (PLMS's look-ahead call, a following step) stay separate.
"""
import contextlib

import torch


def _cpu(v):
    return None if v is None else v.detach().to("cpu", copy=True)


class UNetInputRecorder:
    def __init__(self, uncond_context=None):
        self.entries = []
        self._calls = []  # UNet calls folded into each entry
        self._uncond = None if uncond_context is None else uncond_context.detach().cpu()

    def _is_uncond(self, context):
        if self._uncond is None or context is None:
            return False
        u = self._uncond
        if u.shape[0] == 1 and context.shape[0] > 1:
            u = u.expand_as(context)
        return u.shape == context.shape and torch.equal(u, context)

    def _try_merge(self, entry):
        if not self.entries or self._calls[-1] != 1:
            return False
        last = self.entries[-1]
        same_input = (entry["t"] is not None and last["t"] is not None and torch.equal(last["t"], entry["t"])
                      and last["x"].shape == entry["x"].shape and torch.equal(last["x"], entry["x"]))
        if not same_input or (last["context"] is None) != (entry["context"] is None):
            return False
        first, second = last, entry
        if self._is_uncond(entry["context"]) and not self._is_uncond(last["context"]):
            first, second = entry, last  # cond was evaluated first: put uncond rows first anyway
        merged = {k: torch.cat([first[k], second[k]]) for k in ("x", "t")}
        merged["context"] = None if first["context"] is None else torch.cat([first["context"], second["context"]])
        for k in first:
            if k not in merged:
                merged[k] = torch.cat([first[k], second[k]])
        self.entries[-1] = merged
        self._calls[-1] = 2
        return True

    def hook(self, module, args, kwargs):
        x = args[0] if len(args) > 0 else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs.get("timesteps")
        context = args[2] if len(args) > 2 else kwargs.get("context")
        entry = {"x": _cpu(x), "t": None if t is None else _cpu(t).long(), "context": _cpu(context)}
        y = args[3] if len(args) > 3 else kwargs.get("y")
        if y is not None:  # class-label conditioning ("adm"); absent for the LDM configs
            entry["y"] = _cpu(y)
        if not self._try_merge(entry):
            self.entries.append(entry)
            self._calls.append(1)
        return None


@contextlib.contextmanager
def record_module_inputs(unet, uncond_context=None):
    """Attach a recorder to `unet` for the duration of the block; the hook is removed on exit."""
    recorder = UNetInputRecorder(uncond_context)
    handle = unet.register_forward_pre_hook(recorder.hook, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()
