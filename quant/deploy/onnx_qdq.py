"""ONNX with QuantizeLinear/DequantizeLinear for TensorRT explicit quantization; ONNX Runtime runs it on the CPU.

The graph is traced from ``graph.DeployUNet`` in the "qdq" flavor: weights are int8 initializers behind a
per-channel DequantizeLinear (axis 0, zero point 0); activations go through a per-tensor Q/DQ pair with scale 1
and zero point 0 on integer codes (8-bit asymmetric codes shifted by −128, with the (128 − z_k)·K term that makes
the shift exact); the per-step Δ_k, z_k are float scalars gathered by the ``step`` input around the conv. So the
same file serves every sampling step. TensorRT fuses Q/DQ → Conv/MatMul ← DQ into INT8 kernels; weights of 4
bits or less still run as INT8 there (TensorRT's INT4 is weight-only).

TensorRT itself (``build_tensorrt_engine``, ``time_tensorrt_engine``) needs the ``tensorrt`` package and a CUDA
device and is only exercised by benchmarks/gpu_check.sh.
"""
import io
import json
import os
import time
import warnings

import numpy as np
import torch
from torch import nn

from ldm.util import UserError, atomic_write_bytes
from quant.deploy import require
from quant.step import StepTable

FORMAT = "mpqdm-engine-onnx-qdq"
OPSET = 17


@torch.no_grad()
def export_onnx(deploy, example, path, header):
    """Trace ``deploy`` (qdq flavor) on example = (x, t, context|None, step) into an ONNX file with a dynamic batch."""
    require("onnx", "The onnx package")
    import onnx

    deploy(*example)   # eager pass: builds the input-size dependent K maps
    names = [n for n, v in zip(("x", "timesteps", "context", "step"), example) if v is not None]
    args = tuple(v for v in example if v is not None)
    module = deploy if example[2] is not None else _NoContext(deploy)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=["eps"], do_constant_folding=True,
                          dynamic_axes={n: {0: "batch"} for n in names if n != "step"} | {"eps": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mpqdm_engine", json.dumps({"format": FORMAT, **header}, separators=(",", ":"))
    atomic_write_bytes(path, proto.SerializeToString())
    return path


class _NoContext(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, timesteps, step):
        return self.inner(x, timesteps, None, step)


def read_header(path):
    require("onnx", "The onnx package")
    import onnx
    if not os.path.isfile(path):
        raise UserError(f"The ONNX engine model {path} does not exist; make it with quant_scripts/07_deploy.py.")
    try:
        proto = onnx.load(path, load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        header = json.loads(meta["mpqdm_engine"])
    except Exception as err:
        raise UserError(f"{path} is not an ONNX engine model written by quant_scripts/07_deploy.py "
                        f"({type(err).__name__}).") from None
    return header


def qdq_counts(path):
    """{op type: count} of the Q/DQ-relevant ops of an ONNX file (QuantizeLinear, DequantizeLinear, Conv, ...)."""
    import onnx
    counts = {}
    for node in onnx.load(path).graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Conv", "MatMul", "Gemm"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class OrtUNet(nn.Module):
    """An ONNX engine file run by ONNX Runtime (CPU) behind the QuantUNet call contract (numerics check)."""

    def __init__(self, path, threads=None):
        super().__init__()
        ort = require("onnxruntime", "ONNX Runtime")
        self.header = read_header(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.table = StepTable(self.header["timesteps"])

    @torch.no_grad()
    def forward(self, x, timesteps=None, context=None, **kwargs):
        t = torch.as_tensor(timesteps).reshape(-1).expand(x.shape[0]) if torch.as_tensor(timesteps).numel() == 1 \
            else torch.as_tensor(timesteps).reshape(-1)
        feed = {"x": x.detach().float().cpu().numpy(), "timesteps": t.to(torch.long).cpu().numpy()}
        if "context" in self.input_names:
            feed["context"] = context.detach().float().cpu().numpy()
        if "step" in self.input_names:
            feed["step"] = np.array(self.table.lookup(timesteps), dtype=np.int64)
        out = self.session.run(["eps"], feed)[0]
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------------------------ TensorRT
def build_tensorrt_engine(onnx_path, engine_path, batch, fp16=True, workspace_gib=8):
    """Build a TensorRT engine from the Q/DQ ONNX file (explicit quantization: INT8 where Q/DQ say so, FP16 or
    FP32 elsewhere); the batch dimension gets one optimization profile at ``batch``. Needs tensorrt + CUDA."""
    trt = require("tensorrt", "TensorRT")
    if not torch.cuda.is_available():
        raise UserError("building a TensorRT engine needs a CUDA device; none is available here.")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):   # implicit in TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path}: {errors}.")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib) << 30)
    config.set_flag(trt.BuilderFlag.INT8)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        if shape and shape[0] == -1:
            fixed = tuple([batch] + shape[1:])
            profile.set_shape(inp.name, fixed, fixed, fixed)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path}.")
    atomic_write_bytes(engine_path, bytes(serialized))
    return engine_path


def time_tensorrt_engine(engine_path, feed, repeats=20):
    """Median latency (s) of one call of a TensorRT engine on torch CUDA tensors ``feed`` {input name: tensor}."""
    trt = require("tensorrt", "TensorRT")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(engine_path, "rb") as fh:
        engine = runtime.deserialize_cuda_engine(fh.read())
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    out = None
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = feed[name].contiguous()
            feed[name] = t
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            out = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda", dtype=torch.float32)
            context.set_tensor_address(name, out.data_ptr())
    times = []
    for i in range(repeats + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return float(np.median(times)), out
