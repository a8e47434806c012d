"""OpenVINO IR for the CPU: build it from a DeployUNet, run it with the QuantUNet call contract.

The IR (``unet.xml`` + ``unet.bin``) is traced from ``graph.DeployUNet``: integer weights as int8 constants times
a per-channel Δ, activations through a FakeQuantize with a fixed code range, the step index as an input, a dynamic
batch dimension and a static latent size. The toolkit's header (schedule, method, bits, decisions) travels in the
IR's rt_info under ``mpqdm_engine``, so the file alone defines the engine model.

``load_engine_unet(path, device="cpu", threads=None)`` returns an nn.Module with forward(x, timesteps,
context=None) -> eps; its StepTable resolves the step index from the timestep values (any subset of the engine's
schedule works: the graph holds every step's scales).
"""
import json
import os
import warnings

import numpy as np
import torch
from torch import nn

from ldm.util import UserError
from quant.deploy import require
from quant.step import StepTable

FORMAT = "mpqdm-engine-openvino"
FORMAT_VERSION = 1
RT_KEY = "mpqdm_engine"
INPUTS = ("x", "timesteps", "context", "step")


def _ov():
    return require("openvino", "OpenVINO")


def example_inputs(batch, latent_shape, context_shape=None, step=0, timestep=1):
    """(x, timesteps, context|None, step) of the traced call; context_shape excludes the batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch,) + tuple(latent_shape), generator=g)
    t = torch.full((batch,), int(timestep), dtype=torch.long)
    ctx = None if context_shape is None else torch.randn((batch,) + tuple(context_shape), generator=g)
    return x, t, ctx, torch.tensor(int(step), dtype=torch.long)


@torch.no_grad()
def convert(deploy, example):
    """ov.Model of a DeployUNet traced on ``example`` = (x, t, context|None, step), inputs named, batch dynamic."""
    ov = _ov()
    deploy(*example)   # eager pass first: layers whose K map depends on the input size build it here
    names = [n for n, v in zip(INPUTS, example) if v is not None]
    args = tuple(v for v in example if v is not None)
    if example[2] is None:
        class _NoContext(nn.Module):   # the traced signature must not carry a None
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x, timesteps, step):
                return self.inner(x, timesteps, None, step)
        module = _NoContext(deploy)
    else:
        module = deploy
    with warnings.catch_warnings():   # tracer warnings about shapes that are static in the graph by design
        warnings.simplefilter("ignore")
        model = ov.convert_model(module, example_input=args)
    shapes = {}
    for port, name, value in zip(model.inputs, names, args):
        port.get_tensor().set_names({name})
        dims = list(value.shape)
        if dims and name != "step":
            dims[0] = -1
        shapes[port] = ov.PartialShape(dims)
    model.reshape(shapes)
    model.outputs[0].get_tensor().set_names({"eps"})
    return model


def save(model, path, header):
    """Write ``path`` (.xml, with its .bin) atomically enough for a pipeline: both written, then renamed."""
    ov = _ov()
    if not path.endswith(".xml"):
        raise UserError(f"an OpenVINO IR path must end in .xml, got {path}.")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **header}
    model.set_rt_info(json.dumps(header, separators=(",", ":")), [RT_KEY])
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".tmp-" + os.path.basename(path))
    ov.save_model(model, tmp, compress_to_fp16=False)
    os.replace(tmp[:-4] + ".bin", path[:-4] + ".bin")
    os.replace(tmp, path)
    return path


def read_header(path):
    """The toolkit header of an engine IR; UserError when the file is missing or not one."""
    ov = _ov()
    path = os.fspath(path)
    if not os.path.isfile(path) or not os.path.isfile(path[:-4] + ".bin"):
        raise UserError(f"The OpenVINO engine model {path} (with its .bin) does not exist; make it with "
                        "quant_scripts/07_deploy.py.")
    try:
        model = ov.Core().read_model(path)
        header = json.loads(model.get_rt_info([RT_KEY]).astype(str))
    except Exception as err:
        raise UserError(f"{path} is not an engine model written by quant_scripts/07_deploy.py "
                        f"({type(err).__name__}).") from None
    if header.get("format") != FORMAT:
        raise UserError(f"{path} is not an engine model written by quant_scripts/07_deploy.py.")
    return model, header


def compile_model(model, device="cpu", threads=None, streams=1):
    """Compile for the device (f32 inference precision: no silent bf16 on AMX/AVX-512-BF16 CPUs). ``streams`` > 1
    compiles that many CPU streams sharing one copy of the weights, the threads divided among them: EngineUNet
    then runs slices of a batch on them at once, which scales across cores better than splitting every small
    kernel over all threads (OpenVINO's throughput mode)."""
    ov = _ov()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if streams > 1:
        config["NUM_STREAMS"] = int(streams)
    else:
        config["PERFORMANCE_HINT"] = "LATENCY"
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    target = "CPU" if str(device).lower() == "cpu" else str(device).upper()
    try:
        return ov.Core().compile_model(model, target, config)
    except RuntimeError as err:
        raise UserError(f"OpenVINO could not compile the engine model for {target} ({str(err).splitlines()[0]}).") \
            from None


def kernel_precisions(compiled):
    """{layer type: {runtime precision: count}} over the compiled graph's convolutions and matmuls, i.e. which
    kernels really run in int8 (u8/i8) and which in f32."""
    counts = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind not in ("Convolution", "FullyConnected", "MatMul", "GroupConvolution"):
            continue
        prec = info["runtimePrecision"].astype(str)
        counts.setdefault(kind, {})
        counts[kind][prec] = counts[kind].get(prec, 0) + 1
    return counts


def int8_summary(counts):
    """(int8 kernels, float kernels) from kernel_precisions."""
    low = sum(n for per in counts.values() for p, n in per.items() if p in ("u8", "i8"))
    return low, sum(n for per in counts.values() for n in per.values()) - low


class EngineUNet(nn.Module):
    """A compiled engine model behind the QuantUNet call contract (torch tensors in, torch out)."""

    def __init__(self, compiled, header, path=None, streams=1):
        super().__init__()
        self.compiled, self.header, self.path = compiled, header, path
        self.requests = [compiled.create_infer_request() for _ in range(max(1, int(streams)))]
        self.input_names = {n for port in compiled.inputs for n in port.get_names()}
        steps = header.get("timesteps") or []
        self.table = StepTable(steps) if steps else None

    def meta(self):
        """The header in the terms of a run_dir artifact's meta (for 04's agreement checks)."""
        h = self.header
        return {"method": h.get("method"), "n_bits_w": h.get("w_bits"), "n_bits_a": h.get("a_bits"),
                "timesteps": h.get("timesteps"), "config_hash": h.get("config_hash")}

    @torch.no_grad()
    def forward(self, x, timesteps=None, context=None, **kwargs):
        if kwargs.get("y") is not None:
            raise UserError("the engine model takes no class labels y; class-conditional LDMs pass them as context.")
        t = torch.as_tensor(timesteps).reshape(-1)
        if t.numel() == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        feed = {"x": x.detach().float().cpu().numpy(), "timesteps": t.to(torch.long).cpu().numpy()}
        if "context" in self.input_names:
            if context is None:
                raise UserError("the engine model was built for a conditional UNet; call it with a context.")
            feed["context"] = context.detach().float().cpu().numpy()
        if "step" in self.input_names:
            feed["step"] = np.array(self.table.lookup(timesteps), dtype=np.int64)
        eps = torch.from_numpy(self._run(feed, x.shape[0]))
        return eps.to(device=x.device, dtype=x.dtype)

    def _run(self, feed, batch):
        """One request for the whole batch, or near-equal batch slices on the streams at once (every sample is
        computed on its own, so only the kernels' blocking, i.e. float rounding, can differ)."""
        output = self.compiled.outputs[0]
        if len(self.requests) == 1 or batch < 2:
            return np.array(self.requests[0].infer(feed)[output], copy=True)
        bounds = np.linspace(0, batch, min(len(self.requests), batch) + 1).round().astype(int)
        active = []
        for request, lo, hi in zip(self.requests, bounds[:-1], bounds[1:]):
            request.start_async({k: (v if k == "step" else v[lo:hi]) for k, v in feed.items()})
            active.append(request)
        for request in active:
            request.wait()
        return np.concatenate([np.array(r.get_tensor(output).data, copy=True) for r in active])


def load_engine_unet(path, device="cpu", threads=None, streams=1):
    """EngineUNet of an IR written by quant_scripts/07_deploy.py (device: "cpu", or an OpenVINO device name;
    streams: see compile_model)."""
    model, header = read_header(path)
    return EngineUNet(compile_model(model, device, threads, streams), header, os.fspath(path), streams).eval()
