"""Engine models on the tiny cin-shaped UNet: OpenVINO IR (int8 kernels really run) and the ONNX Q/DQ graph run
by ONNX Runtime, both against the fake-quant model; a missing engine is one sentence naming the extra.

Tolerance. With every int8 part exact (``wide="fp"`` keeps the four 8-bit special layers float), the engine
differs from the fake-quant model only where x/Δ sits within float error of a rounding tie and a code flips; each
flip moves that layer's output by Δ·|w| and the UNet carries it on. The bound is relative L2 of (engine − fake)
≤ 0.25 × the model's own quantization error (fake − FP) at that step: an engine that dropped a step's scales,
the smoothing, a zero-point term or a requantization would be off by the order of the quantization error (measured
on this model: requantizing the four 8-bit layers to 7 bits already gives 0.32× at W2A4, requantizing every
8-bit layer of a W8A8 model 0.67×; the step test in test_deploy_graph.py shows the per-step scales alone move ε
by more than 5× the deviation allowed there).
"""
import sys

import pytest
import torch

from ldm.util import UserError
from quant.api import make_config, quantize_
from quant.deploy.describe import decide_modes, describe_unet
from quant.deploy.graph import build_deploy_unet
from quant.stages.calibrate import calibrate

from refdata import tiny_cin_unet

TIMESTEPS = [1, 334, 667]
NO_VNNI = {"vnni": False, "amx": False, "flags": ["avx2"]}


@torch.no_grad()
def quantized(method, w_bits, a_bits):
    qunet = quantize_(tiny_cin_unet(seed=0), make_config(method, w_bits=w_bits, a_bits=a_bits, lora_rank=0), TIMESTEPS)
    g = torch.Generator().manual_seed(0)
    calibrate(qunet, torch.randn(6, 3, 8, 8, generator=g), torch.tensor(TIMESTEPS * 2),
              torch.randn(6, 1, 32, generator=g))
    for _, layer in qunet.quant_layers():           # per-step scales that differ, as after fine-tuning
        q = layer.act_quantizer
        if q.delta.dim() == 1 and q.delta.numel() == len(TIMESTEPS):
            q.make_temporal()
            q.delta.mul_(torch.tensor([0.8, 1.0, 1.25]))
    return qunet.eval()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def check_against_fake(runner, qunet):
    fp = tiny_cin_unet(seed=0)
    g = torch.Generator().manual_seed(7)
    x, c = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 1, 32, generator=g)   # batch 3 ≠ traced batch 2
    for t in TIMESTEPS:
        ts = torch.full((3,), t)
        fake = qunet(x, ts, context=c)
        got = runner(x, ts, c)
        assert got.shape == fake.shape and got.dtype == fake.dtype
        assert rel(got, fake) <= 0.25 * rel(fake, fp(x, ts, context=c)), f"t={t}"


@pytest.mark.slow
@pytest.mark.parametrize("method,w_bits,a_bits,wide", [("mpqdm", 4, 8, "fp"), ("mpqdm", 2, 4, "fp")])
def test_openvino_engine_matches_fake_quant(tmp_path, method, w_bits, a_bits, wide):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (pip install -e '.[deploy]')")
    from quant.deploy import openvino as dov
    qunet = quantized(method, w_bits, a_bits)
    layers = describe_unet(qunet)
    decide_modes(layers, wide, NO_VNNI)
    example = dov.example_inputs(2, (3, 8, 8), (1, 32), 1, TIMESTEPS[1])
    path = str(tmp_path / "unet.xml")
    dov.save(dov.convert(build_deploy_unet(qunet, layers), example), path, {"timesteps": TIMESTEPS})
    kinds = {}
    for op in dov.read_header(path)[0].get_ops():   # rule 5: quantizers and SiLUs work on rows views, not 4D maps
        if op.get_type_name() in ("FakeQuantize", "Swish", "Sigmoid"):
            kinds[op.get_type_name()] = kinds.get(op.get_type_name(), 0) + 1
            assert op.get_input_partial_shape(0).rank.get_length() <= 3, op.get_friendly_name()
    assert kinds.get("FakeQuantize", 0) >= sum(p.mode != "fp" for l in layers for p in l.parts) and kinds.get("Swish")
    engine = dov.load_engine_unet(path, threads=1)
    check_against_fake(engine, qunet)
    low, high = dov.int8_summary(dov.kernel_precisions(engine.compiled))
    n_int = sum(p.mode != "fp" for l in layers for p in l.parts)
    assert low >= n_int - 4 and low > high        # the quantized convs/linears really run on int8 kernels
    with pytest.raises(UserError, match="not in the quantized model's schedule"):
        engine(torch.zeros(1, 3, 8, 8), torch.tensor([5]), torch.zeros(1, 1, 32))
    # two streams run batch slices at once; the samples are the same up to kernel blocking
    streamed = dov.load_engine_unet(path, threads=2, streams=2)
    assert len(streamed.requests) == 2
    check_against_fake(streamed, qunet)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 1, 32, generator=g)
    ts = torch.full((5,), TIMESTEPS[2])
    assert rel(streamed(x, ts, c), engine(x, ts, c)) < 1e-3
    assert rel(streamed(x[:1], ts[:1], c[:1]), engine(x[:1], ts[:1], c[:1])) < 1e-3   # one sample: one stream


@pytest.mark.slow
def test_onnx_qdq_matches_fake_quant_with_onnxruntime(tmp_path):
    pytest.importorskip("onnx", reason="onnx is an optional extra (pip install -e '.[deploy]')")
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is an optional extra (pip install -e '.[deploy]')")
    from quant.deploy import onnx_qdq
    from quant.deploy.openvino import example_inputs
    qunet = quantized("mpqdm", 4, 8)
    layers = describe_unet(qunet)
    # TensorRT sums in int32 (no 16-bit overflow); the 8-bit special layers (|c − z| > 127) stay float here so
    # every int8 part is exact and the bound below applies
    decide_modes(layers, "fp", {"vnni": True, "amx": False, "flags": []})
    path = str(tmp_path / "unet.onnx")
    onnx_qdq.export_onnx(build_deploy_unet(qunet, layers, "qdq"), example_inputs(2, (3, 8, 8), (1, 32), 1, 334),
                         path, {"timesteps": TIMESTEPS})
    counts = onnx_qdq.qdq_counts(path)
    n_int = sum(p.mode != "fp" for l in layers for p in l.parts)
    assert counts["QuantizeLinear"] == n_int and counts["DequantizeLinear"] == 2 * n_int
    # TensorRT's INT8 pattern: both inputs of every quantized Conv come straight from a DequantizeLinear
    import onnx
    graph = onnx.load(path).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    int8_convs = [n for n in convs if producer.get(n.input[1]) == "DequantizeLinear"]
    assert int8_convs and all(producer.get(n.input[0]) == "DequantizeLinear" for n in int8_convs)
    check_against_fake(onnx_qdq.OrtUNet(path, threads=1), qunet)


def test_missing_engine_is_one_sentence(monkeypatch):
    from quant.deploy import openvino as dov
    monkeypatch.setitem(sys.modules, "openvino", None)      # import openvino -> ImportError
    with pytest.raises(UserError) as err:
        dov.load_engine_unet("anything.xml")
    text = str(err.value)
    assert 'pip install -e ".[deploy]"' in text and text.count(". ") == 0 and "\n" not in text


def test_missing_tensorrt_names_its_own_extra(monkeypatch):
    from quant.deploy import require
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError) as err:
        require("tensorrt", "TensorRT")
    text = str(err.value)
    assert text.startswith("TensorRT is not installed") and 'pip install -e ".[tensorrt]"' in text
    assert "[deploy]" not in text and "\n" not in text
