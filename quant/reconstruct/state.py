"""Resumable reconstruction: a run directory records finished units (and stage results) with their tensors.

``<run_dir>/recon/state.json`` = {"fingerprint", "done": [[stage, unit, file], ...]} plus one tensor file per
entry (the unit module's state dict after it finished: finalised integer-grid weights, quantizer scales).
Entries are committed atomically, file first, so a kill loses at most the unit in progress. ``restore`` loads
every recorded entry in order into a freshly wrapped model. The fingerprint (FP model, method config, layer policy,
schedule, calibration rows) must match: state from another model, config or calibration set is refused.
"""
import hashlib
import json
import os

import torch

from ldm.util import UserError, atomic_save, atomic_write_bytes

STATE_VERSION = 1


def fingerprint(parts: dict) -> str:
    """sha256 (first 16 hex digits) of a JSON-able description."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_digest(*tensors) -> str:
    """sha256 over the bytes of CPU tensors (calibration rows): any change of data gives another fingerprint."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


class ReconState:
    def __init__(self, run_dir, fingerprint_value):
        self.dir = os.path.join(os.fspath(run_dir), "recon")
        self.path = os.path.join(self.dir, "state.json")
        self.fingerprint = fingerprint_value
        self.done = []
        if os.path.exists(self.path):
            try:
                with open(self.path) as fh:
                    saved = json.load(fh)
            except (OSError, ValueError):
                raise UserError(f"The reconstruction state {self.path} is unreadable; delete it to start over.") \
                    from None
            if saved.get("fingerprint") != fingerprint_value or saved.get("version") != STATE_VERSION:
                raise UserError(f"The reconstruction state in {self.dir} belongs to another model, method config or "
                                "calibration set; use a fresh run_dir or start over (quant_scripts/02: --restart).")
            self.done = [tuple(e) for e in saved.get("done", [])]
        os.makedirs(self.dir, exist_ok=True)

    def is_done(self, stage, name):
        return any(s == stage and n == name for s, n, _ in self.done)

    def commit(self, stage, name, tensors):
        """Record (stage, name) as finished with its tensors (a state dict)."""
        fname = f"{stage}-{len(self.done):04d}.pt"
        atomic_save({k: v.detach().to("cpu") for k, v in tensors.items()}, os.path.join(self.dir, fname))
        self.done.append((stage, name, fname))
        body = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "done": [list(e) for e in self.done]}
        atomic_write_bytes(self.path, json.dumps(body, indent=1).encode())

    def entries(self):
        """(stage, name, tensors) of every finished entry, in commit order."""
        for stage, name, fname in self.done:
            path = os.path.join(self.dir, fname)
            try:
                tensors = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise UserError(f"The reconstruction state file {path} is unreadable ({type(err).__name__}); "
                                f"delete {self.dir} to start over.") from None
            yield stage, name, tensors
