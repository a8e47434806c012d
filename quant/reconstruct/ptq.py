"""A post-training run's shared setup: the wrapped model, its FP twin, calibration rows, unit plan and resume state.

``PTQSession`` is what a PTQ method (quant.methods.qdiffusion, tfmqdm, edadm) composes its stages
from: ``init_weight_quantizers``, ``stage`` (one driver pass with an objective), ``commit_act_init`` /
``restore``. The unit plan is a plain list a method may edit (insert custom units, drop layers) before running.
"""
import contextlib
import copy
import os
import time

import torch

from ldm.util import UserError
from quant.api import config_to_dict, quantize_
from quant.layers import QuantLayer, QuantMatMul
from quant.quantizer import init_max, init_mse, init_search
from quant.reconstruct.cache import clear_dir
from quant.reconstruct.driver import CalibrationRows, StageOptions, run_stage
from quant.reconstruct.state import ReconState, fingerprint, tensor_digest
from quant.reconstruct.units import plan_units

GB = 1024 ** 3
# options that change where data goes, not what is computed: left out of the resume fingerprint
RUN_OPTIONS = ("max_cache_gb", "cache_dir")


def _act_state_keys(model):
    """State-dict keys of every activation quantizer (the result of activation init)."""
    keys = []
    for name, m in model.named_modules():
        if isinstance(m, (QuantLayer, QuantMatMul)):
            for attr in ("act_quantizer", "act_quantizer_split", "input_quantizers"):
                sub = getattr(m, attr, None)
                if sub is not None:
                    keys += [f"{name}.{attr}.{k}" for k in sub.state_dict()]
    return keys


@torch.no_grad()
def init_weight_quantizers(qunet, scale_method):
    """Per-output-channel (Δ, z) of every weight quantizer (each half of a split layer on its own input channels)
    from the weights, `mse`, `max` or `search` (EDA-DM): data-free, so a resumed run recomputes the same values."""
    init = {"mse": init_mse, "max": init_max, "search": init_search}[scale_method]
    for _, layer in qunet.quant_layers():
        for wq, part in layer.weight_quantizers():
            delta, zero = init(layer.weight[:, part], wq.bits, per_channel=True)
            wq.delta.copy_(delta)
            wq.zero.copy_(zero)
        layer.clear_cache()


class PTQSession:
    def __init__(self, fp_unet, config, rows, run_dir, timesteps, model_id=None, progress=False, unit_classes=None):
        self.config, self.run_dir, self.progress = config, os.fspath(run_dir), progress
        self.device = next(fp_unet.parameters()).device      # the models' device; rows and cache stay on the CPU
        self.fp = fp_unet.eval().requires_grad_(False)
        self.qunet = quantize_(copy.deepcopy(fp_unet), config, timesteps).eval()
        self.q = self.qunet.unet
        self.rows = CalibrationRows(rows["x"], rows["t"], rows.get("context"))
        self.family = self.qunet.policy["family"]
        sample = self.rows.call_args(torch.arange(1), self.device)
        # unit_classes: a method's own choice of block classes (e.g. whole SpatialTransformers), else the family's
        self.units = plan_units(self.q, sample, unit_classes, family=self.family)
        if model_id is None:
            from ldm.generate import model_fingerprint
            model_id = model_fingerprint(fp_unet)
        options = {k: v for k, v in config_to_dict(config).items() if k not in RUN_OPTIONS}
        self.fingerprint = fingerprint({"model": model_id, "config": options, "policy": self.qunet.policy,
                                        "timesteps": list(self.qunet.table.timesteps),
                                        "calibration": tensor_digest(self.rows.x, self.rows.t, self.rows.context)})
        self.state = ReconState(self.run_dir, self.fingerprint)
        self.cache_dir = config.cache_dir or os.path.join(self.state.dir, "cache")
        self._claim_cache_dir()
        self.log = {}

    def _claim_cache_dir(self):
        """The cache dir is marked with this run's fingerprint: another run's cache is refused, stale shards of
        this run (a kill mid-unit) are removed."""
        os.makedirs(self.cache_dir, exist_ok=True)
        mark = os.path.join(self.cache_dir, "OWNER")
        if os.path.exists(mark):
            with open(mark) as fh:
                owner = fh.read().strip()
            if owner != self.fingerprint:
                raise UserError(f"The reconstruction cache {self.cache_dir} belongs to another model, method config or "
                                "calibration set; give another cache_dir, or start over (quant_scripts/02: --restart).")
            clear_dir(self.cache_dir)
        else:
            with open(mark, "w") as fh:
                fh.write(self.fingerprint)

    # -- weight quantizers ---------------------------------------------------------------------------------
    def init_weight_quantizers(self, scale_method):
        init_weight_quantizers(self.qunet, scale_method)

    # -- resume --------------------------------------------------------------------------------------------
    def restore(self):
        """Load every finished entry of the state (unit tensors, activation init) in commit order."""
        units = {u.name: u for u in self.units}
        for stage, name, tensors in self.state.entries():
            if not tensors:
                continue
            if name in units:
                units[name].module(self.q).load_state_dict(tensors)
            else:
                missing, unexpected = self.q.load_state_dict(tensors, strict=False)
                if unexpected:
                    raise UserError(f"The reconstruction state entry {stage}/{name} does not fit this model; "
                                    f"delete {self.state.dir} to start over.")
        for _, layer in self.qunet.quant_layers():
            layer.clear_cache()

    def done(self, stage, name="all"):
        return self.state.is_done(stage, name)

    def commit_act_init(self, stage="act_init"):
        sd = self.q.state_dict()
        self.state.commit(stage, "all", {k: sd[k] for k in _act_state_keys(self.q)})

    # -- stages --------------------------------------------------------------------------------------------
    def options(self, iters, batch_size):
        c = self.config
        budget = int(c.max_cache_gb * GB)
        dtype = torch.float16 if c.cache_dtype == "float16" else None
        return StageOptions(iters, batch_size, c.micro_batch, budget, self.cache_dir, c.seed, self.device, dtype)

    def stage(self, name, objective_for, iters, batch_size, units=None):
        """One driver pass over ``units`` (default: the plan) with ``objective_for(unit)``."""
        log = self.log.setdefault(name, {})
        return run_stage(name, self.units if units is None else units, self.q, self.fp, objective_for, self.rows,
                         self.options(iters, batch_size), self.state, self.progress, log)

    @contextlib.contextmanager
    def timed(self, key):
        """Record the wall seconds of the enclosed stage as ``log["times"][key]`` (the artifact's ptq_times)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.log.setdefault("times", {})[key] = time.perf_counter() - start

    def finish(self):
        for _, m in self.qunet.quant_layers() + self.qunet.quant_matmuls():
            m.calibrated.fill_(True)
            if isinstance(m, QuantLayer):
                m.clear_cache()
        return self.qunet
