import torch
import torch.nn.functional as F

from quant.api import get_method, make_config
from quant.stages.calibrate import calibrate_layer
from quant.layers import LayerSpec, QuantConv2d, QuantLinear
from quant.quantizer import init_max
from quant.step import step_scope


def _conv(seed=0, cin=8, cout=12, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(cin, cout, 3, padding=1, stride=1).to(device)


def _set_state(layer, seed):
    g = torch.Generator().manual_seed(seed)
    cout, cin = layer.weight.shape[:2]
    with torch.no_grad():
        layer.smooth.copy_(torch.rand(cin, generator=g) + 0.5)
        layer.weight_quantizer.bits.copy_(torch.randint(1, 4, (cout,), generator=g, dtype=torch.int32))
        layer.weight_quantizer.delta.copy_(torch.rand(cout, generator=g) * 0.05 + 0.01)
        layer.weight_quantizer.zero.copy_(torch.rand(cout, generator=g) * 3)
        layer.act_quantizer.delta.copy_(torch.tensor([0.05, 0.1, 0.2]))
        layer.act_quantizer.zero.copy_(torch.tensor([7.0, 8.0, 9.5]))
        layer.lora.lora_B.copy_(torch.randn(layer.lora.lora_B.shape, generator=g) * 0.01)
    layer.act_quantizer.make_temporal()


def test_conv_forward_matches_spec_formula(test_device):
    conv = _conv(device=test_device)
    layer = QuantConv2d.from_module(conv, LayerSpec(w_bits=2, a_bits=4, n_steps=3, lora_rank=4, smoothing=True))
    _set_state(layer, 1)
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(2)).to(test_device)
    with step_scope(1):
        y = layer(x)
    # second computation, straight from MPQ-DM.md §4
    wq = layer.weight_quantizer
    A, B = layer.lora.lora_A.detach(), layer.lora.lora_B.detach()
    dW = torch.stack([torch.stack([B[:, :, u, v] @ A[:, :, u, v] for v in range(3)], -1) for u in range(3)], -2)
    ws = (conv.weight.detach() + dW) * layer.smooth.view(1, -1, 1, 1)
    d, z = wq.delta.detach().view(-1, 1, 1, 1), wq.zero.detach().view(-1, 1, 1, 1)
    hi = (2.0 ** wq.bits.float()).view(-1, 1, 1, 1) - 1
    w_hat = (torch.minimum(torch.clamp(torch.round(ws / d) + z, min=0), hi) - z) * d
    xs = x / layer.smooth.view(1, -1, 1, 1)
    x_hat = (torch.clamp(torch.round(xs / 0.1) + 8.0, 0, 15) - 8.0) * 0.1
    assert torch.allclose(y, F.conv2d(x_hat, w_hat, conv.bias, padding=1), atol=1e-5)


def test_gradients_reach_trainables_and_eval_cache(test_device):
    layer = QuantConv2d.from_module(_conv(device=test_device),
                                    LayerSpec(w_bits=3, a_bits=4, n_steps=3, lora_rank=4, smoothing=True))
    _set_state(layer, 3)
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(4)).to(test_device)
    with step_scope(2):
        layer(x).square().sum().backward()
    for p in (layer.lora.lora_A, layer.lora.lora_B, layer.weight_quantizer.delta, layer.weight_quantizer.zero):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.act_quantizer.delta.grad[2] != 0 and layer.act_quantizer.delta.grad[:2].abs().sum() == 0
    assert layer.weight.grad is None
    with torch.no_grad(), step_scope(0):
        y1 = layer(x)
        w1 = layer._cache
        y2 = layer(x)
        assert layer._cache is w1 and torch.equal(y1, y2)      # cached quantized weight reused
        layer.lora.lora_B.add_(0.05)                           # e.g. an optimizer step
        y3 = layer(x)
        assert layer._cache is not w1 and not torch.equal(y1, y3)
    with step_scope(0):
        assert torch.allclose(layer(x), y3, atol=1e-6)         # training path == cached eval path


def test_w8a8_special_layer_close_to_fp(test_device):
    handler = get_method("mpqdm")[1]
    cfg = make_config("mpqdm", w_bits=2, a_bits=4)
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(64, 32).to(test_device)
    conv = _conv(cin=16, cout=24, device=test_device)
    for m, x in ((lin, torch.randn(16, 64, generator=g)), (conv, torch.randn(4, 16, 8, 8, generator=g))):
        x = x.to(test_device)
        layer = (QuantLinear if m is lin else QuantConv2d).from_module(m, LayerSpec(role="special"))
        assert layer.lora is None and not layer.smoothing
        assert all(not p.requires_grad for p in layer.parameters())
        calibrate_layer(layer, x, handler, cfg)
        assert torch.equal(layer.weight_quantizer.bits, torch.full_like(layer.weight_quantizer.bits, 8))
        with torch.no_grad():
            ref = m(x)
            rel = (layer(x) - ref).norm() / ref.norm()
        assert rel < 0.01


def test_efficientdm_integer_weight(test_device):
    handler = get_method("efficientdm")[1]
    cfg = make_config("efficientdm", w_bits=3, a_bits=8)
    spec = handler.layer_spec(cfg, "quant", 3)
    lin = torch.nn.Linear(20, 10).to(test_device)
    layer = QuantLinear.from_module(lin, spec, torch.Generator().manual_seed(0))
    assert spec.int_weight and not spec.smoothing and layer.lora.kind == "linear"
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(6)).to(test_device)
    calibrate_layer(layer, x, handler, cfg)
    d, z = init_max(lin.weight, 3, per_channel=True)
    naive = (torch.clamp(torch.round(lin.weight / d[:, None]) + z[:, None], 0, 7) - z[:, None]) * d[:, None]
    assert layer.weight_int.dtype == torch.uint8 and int(layer.weight_int.max()) <= 7
    assert torch.allclose(layer.base_weight(), naive, atol=1e-6)
    # re-quantising deq(W_int) with the same (Δ, z) is exact, so at LoRA = 0 the layer weight is the naive one
    assert torch.allclose(layer.quantized_weight(), naive, atol=1e-6)


def test_state_dict_loads_into_fresh_layer_without_forward(test_device):
    conv = _conv(device=test_device)
    spec = LayerSpec(w_bits=2, a_bits=4, n_steps=3, lora_rank=4, smoothing=True)
    a = QuantConv2d.from_module(conv, spec, torch.Generator().manual_seed(0))
    _set_state(a, 7)
    b = QuantConv2d.from_module(_conv(seed=9, device=test_device), spec, torch.Generator().manual_seed(1))
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, 5, 5, generator=torch.Generator().manual_seed(8)).to(test_device)
    with torch.no_grad(), step_scope(2):
        assert torch.equal(a(x), b(x))
