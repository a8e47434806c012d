"""Engine graph rules (quant.deploy.describe / graph) in plain torch: no engine needed.

The engine layer computes Δ_k·conv(c, q·Δw) − Δ_k·z_k·K + b on integer codes c; on the same input it must equal
the fake-quant layer's conv((c − z_k)·Δ_k, Ŵ) + b up to float32 reassociation (the code sums reach
~255·Σ|Ŵ|, so the bound is relative to that, not to the output), except where x/Δ lies within an ulp of a
rounding tie and one code flips (by one step, Δ_k·|Ŵ|).
"""
import pytest
import torch

from quant.api import make_config, quantize_
from quant.deploy.describe import (ACC16_LIMIT, ActSpec, LayerExport, Part, WeightSpec, cpu_int8_isa, decide_modes,
                                   describe_unet, requantize, weight_limit)
from quant.deploy.graph import EngineLayer, StepHolder, build_deploy_unet
from quant.stages.calibrate import calibrate
from quant.step import step_scope

from refdata import tiny_cin_unet

TIMESTEPS = [1, 334, 667]
NO_VNNI = {"vnni": False, "amx": False, "flags": ["avx2"]}


@torch.no_grad()
def calibrated(method, w_bits, a_bits, spread=True):
    qunet = quantize_(tiny_cin_unet(seed=0), make_config(method, w_bits=w_bits, a_bits=a_bits, lora_rank=0), TIMESTEPS)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 1, 32, generator=g)
    calibrate(qunet, x, torch.tensor(TIMESTEPS * 2), c)
    if spread:   # fine-tuned-like per-step scales (integral zero points)
        for _, layer in qunet.quant_layers():
            q = layer.act_quantizer
            if q.delta.dim() == 1 and q.delta.numel() == 3:
                q.make_temporal()
                q.delta.mul_(torch.tensor([0.8, 1.0, 1.25]))
                q.zero.add_(torch.tensor([0.0, 1.0, -2.0])).clamp_(0, 2 ** q.n_bits - 1)
    return qunet.eval()


@pytest.mark.parametrize("method,w_bits,a_bits", [("efficientdm", 4, 8), ("mpqdm", 2, 4)])
@torch.no_grad()
def test_engine_layer_matches_fake_quant_layer(method, w_bits, a_bits):
    qunet = calibrated(method, w_bits, a_bits)
    layers = describe_unet(qunet)
    decide_modes(layers, "fp", NO_VNNI)            # 8-bit special layers FP: every other part int8, exact
    deploy = build_deploy_unet(qunet, layers)
    engine = {n: m for n, m in deploy.unet.named_modules() if isinstance(m, EngineLayer)}
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, (a[0], o)))
             for n, m in qunet.quant_layers()]
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 1, 32, generator=g)
    qunet(x, torch.full((4,), TIMESTEPS[2]), context=c)
    for h in hooks:
        h.remove()
    deploy.steps.index = torch.tensor(2)
    flipped = total = 0
    for name, (a, want) in inputs.items():
        got = engine[name](a)
        w_abs = engine[name]._w_hat(engine[name].parts[0]).abs()
        scale = 255 * float(w_abs.reshape(w_abs.shape[0], -1).sum(1).max()) * float(qunet.unet.get_submodule(name)
                                                                                     .act_quantizer.delta.max())
        bad = (got - want).abs() > 1e-5 * scale + 1e-6
        flipped += int(bad.sum())
        total += bad.numel()
    assert flipped <= 1e-3 * total, f"{flipped} of {total} outputs differ beyond float reassociation"


@torch.no_grad()
def test_two_steps_give_the_two_fake_quant_outputs():
    qunet = calibrated("mpqdm", 4, 8)
    layers = describe_unet(qunet)
    decide_modes(layers, "fp", NO_VNNI)
    deploy = build_deploy_unet(qunet, layers)
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 1, 32, generator=g)
    t = torch.full((2,), TIMESTEPS[1])         # same timestep input, two different step tables
    outs, refs = [], []
    for k in (0, 2):
        with step_scope(k):
            refs.append(qunet.unet(x, t, context=c))
        outs.append(deploy(x, t, c, torch.tensor(k)))
    gap = float((refs[0] - refs[1]).abs().mean())
    assert gap > 0.02                             # the two steps' scales really differ
    # each layer matches its fake-quant twin up to float reassociation (the test above); through the whole UNet the
    # few rounding flips that reassociation causes compound (up to ~0.01 mean here, torch 2.14; the max is fragile
    # across torch builds), so compare means: each output follows its own step's table, far closer to it than to
    # the other's
    for k, out in enumerate(outs):
        own, other = float((out - refs[k]).abs().mean()), float((out - refs[1 - k]).abs().mean())
        assert own < 0.3 * gap and own < 0.5 * other, (k, own, other, gap)


@torch.no_grad()
def test_attention_with_more_tokens_than_channels():
    """A linear's channels are its last dim: at 16x16 the attention blocks see 64 tokens of 32 channels (the tiny
    8x8 input has 16 tokens, fewer than the channels, which hid a slice over tokens; cin256 has 1024 of 384)."""
    qunet = calibrated("mpqdm", 4, 8, spread=False)
    layers = describe_unet(qunet)
    decide_modes(layers, "fp", NO_VNNI)
    deploy = build_deploy_unet(qunet, layers)
    g = torch.Generator().manual_seed(6)
    x, c = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 1, 32, generator=g)
    t = torch.full((2,), TIMESTEPS[1])
    with step_scope(1):
        ref = qunet.unet(x, t, context=c)
    fp = tiny_cin_unet(seed=0)(x, t, context=c)
    out = deploy(x, t, c, torch.tensor(1))
    assert out.shape == ref.shape
    assert float((out - ref).norm()) < 0.25 * float((ref - fp).norm())   # engine ≈ fake quant, far below its error


def test_weight_codes_are_signed_with_zero_point_zero():
    qunet = calibrated("mpqdm", 2, 4, spread=False)
    for layer in describe_unet(qunet):
        for part in layer.parts:
            bits = part.weight.bits.to(torch.float32).view((-1,) + (1,) * (part.weight.q.dim() - 1))
            assert bool((part.weight.q.abs() <= 2 ** bits - 1).all())   # c − z of a b-bit code
            assert part.weight.max_dev < 1e-5 * float(part.weight.delta.max())  # exactly on the grid


def test_overflow_rule_and_requantization():
    assert weight_limit(8, NO_VNNI) == ACC16_LIMIT // (2 * 255) == 64
    assert weight_limit(4, NO_VNNI) == 127 and weight_limit(8, {"vnni": True, "amx": False}) == 127
    q = torch.tensor([[100, -3], [10, -64]], dtype=torch.int16)
    ws = WeightSpec(q, torch.tensor([0.5, 2.0]), torch.tensor([8, 8]))
    out = requantize(ws, 64)
    assert torch.equal(out.q[1], q[1]) and float(out.delta[1]) == 2.0           # a fitting channel is untouched
    assert int(out.q[0].abs().max()) == 64
    assert float(out.delta[0]) == pytest.approx(0.5 * 100 / 64)
    assert out.max_dev <= float(out.delta[0]) / 2 + 1e-6
    act8 = ActSpec(8, torch.ones(3), torch.zeros(3))
    layer = LayerExport("l", "linear", {}, None, [Part(0, 2, act8, ws)])
    policy, _ = decide_modes([layer], "auto", NO_VNNI)
    assert policy == "requant" and layer.parts[0].mode == "requant"
    layer = LayerExport("l", "linear", {}, None, [Part(0, 2, ActSpec(4, torch.ones(3), torch.zeros(3)), ws)])
    decide_modes([layer], "auto", NO_VNNI)
    assert layer.parts[0].mode == "int8"           # 4-bit codes: 2·15·100 < 32767


def test_cpu_flags_are_read(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_int8_isa(str(info)) == {"vnni": True, "amx": False, "flags": ["avx2", "avx512_vnni", "avx512f"]}
    assert cpu_int8_isa(str(tmp_path / "missing"))["vnni"] is False


@pytest.mark.parametrize("size,stride,last_mode", [(7, 1, "int8"), (2, 1, "int8"), (4, 2, "fp"), (3, 1, "fp")])
@torch.no_grad()
def test_split_input_layer_sums_its_parts(size, stride, last_mode):
    """A split-input layer (post-training peers): two act quantizers and weight slices, summed; the first part
    smoothed (X ⊙ 1/s), the second int8 or float. Map sizes cover every rows view: 7x7 (one channel a row), 2x2
    and 4x4 -> 2x2 (channels folded into a row), 3x3 (9-element rows that cannot fill a vector)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-7, 8, (5, 6, 3, 3), generator=g).to(torch.int16)
    dw = torch.rand(5, generator=g) + 0.1
    acts = [ActSpec(8, torch.tensor([0.05, 0.1]), torch.tensor([100.0, 120.0])),
            ActSpec(4, torch.tensor([0.2, 0.3]), torch.tensor([3.0, 8.0]))]
    s_inv = torch.rand(4, generator=g) + 0.5
    parts = [Part(0, 4, acts[0], WeightSpec(w[:, :4], dw, torch.full((5,), 4)), smooth_inv=s_inv),
             Part(4, 6, acts[1], WeightSpec(w[:, 4:], dw, torch.full((5,), 4)), mode=last_mode)]
    bias = torch.randn(5, generator=g)
    args = {"stride": (stride, stride), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    steps = StepHolder()
    layer = EngineLayer(LayerExport("s", "conv", args, bias, parts), steps, "openvino")
    x = torch.randn(2, 6, size, size, generator=g) * 3
    steps.index = torch.tensor(1)
    got = layer(x)
    w_hat = w.float() * dw.view(-1, 1, 1, 1)

    def fq(v, a):
        d, z = a.delta[1], a.zero[1]
        return (torch.clamp(torch.round(v / d) + z, 0, a.hi) - z) * d
    conv = torch.nn.functional.conv2d
    want = (conv(fq(x[:, :4] * s_inv.view(1, -1, 1, 1), acts[0]), w_hat[:, :4], bias, stride, 1)
            + conv(fq(x[:, 4:], acts[1]), w_hat[:, 4:], None, stride, 1))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)   # float reassociation of sums ~50
