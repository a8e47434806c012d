"""AdaRound (quant.adaround) against closed forms: init, soft/hard weight, regulariser schedule, finalisation."""
import math

import pytest
import torch

from quant import adaround
from quant.layers import LayerSpec, QuantConv2d, QuantLinear
from quant.quantizer import fake_quant, init_mse
from quant.reconstruct.objectives import AdaRoundWeights, Objective
from quant.reconstruct.solver import solve
from quant.reconstruct.units import Unit


def _layer(seed=0, bits=3, split=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(12, 8, 1 if split else 3, padding=0 if split else 1)
    layer = QuantConv2d.from_module(conv, LayerSpec(w_bits=bits, lora_rank=0, act_quant=False, split=split,
                                                    rounding="adaround"))
    with torch.no_grad():
        for wq, part in layer.weight_quantizers():
            d, z = init_mse(layer.weight[:, part], bits, per_channel=True)
            wq.delta.copy_(d)
            wq.zero.copy_(z)
    return layer


def test_init_reproduces_nearest_rounding_inputs():
    layer = _layer()
    nearest = layer.quantized_weight().detach().clone()
    (ada,) = adaround.attach(layer)
    wq = layer.weight_quantizer
    scaled = layer.weight / wq.delta.view(-1, 1, 1, 1)
    frac = scaled - torch.floor(scaled)
    inner = (frac > 1e-4) & (frac < 1 - 1e-4)
    assert inner.float().mean() > 0.99
    # floor(W/Δ) + h(V) = W/Δ where the fractional part is inside (0, 1): the inputs of nearest rounding
    h = ada.h().detach()
    assert torch.allclose((torch.floor(scaled) + h)[inner], scaled[inner], atol=1e-5, rtol=0)
    # hand formula of h(V) = clamp(σ(V)·1.2 - 0.1, 0, 1)
    v = ada.alpha.detach()
    assert torch.allclose(h, torch.clamp(1.2 / (1 + torch.exp(-v)) - 0.1, 0, 1), atol=1e-6)
    # the soft weight is then W itself inside the grid range (no rounding applied yet)
    soft = layer.quantized_weight().detach()
    z, d = wq.zero.view(-1, 1, 1, 1), wq.delta.view(-1, 1, 1, 1)
    in_range = ((scaled + z) >= 0) & ((scaled + z) <= 7) & inner
    assert torch.allclose(soft[in_range], layer.weight[in_range], atol=1e-5)
    # hard rounding of the initial V (1[V >= 0] = 1[frac >= 0.5]) is nearest rounding
    ada.soft = False
    layer.clear_cache()
    assert torch.equal(layer.quantized_weight().detach(), nearest)


def test_regulariser_schedule_hand_computed():
    s = adaround.RoundingSchedule(n_iters=100)       # warm-up 20 %, β 20 -> 2, λ 0.01
    assert [s.active(c) for c in (1, 19, 20, 100)] == [False, False, True, True]
    assert s.beta(1) == 20 and s.beta(19) == 20 and s.beta(20) == 20
    assert s.beta(60) == pytest.approx(2 + 18 * (1 - 40 / 80))     # 11
    assert s.beta(100) == pytest.approx(2.0)
    # f_reg of known h values: h = 0.5 costs 1 per entry, h in {0, 1} costs 0, h = 0.75 costs 1 - 0.5^β
    ada = adaround.AdaRound(torch.zeros(4), torch.ones(4))
    with torch.no_grad():      # V for h = 0.5, 0, 1, 0.75 (σ(V) = (h + 0.1)/1.2)
        ada.alpha.copy_(torch.tensor([math.log(0.6 / 0.6), -50.0, 50.0, math.log((0.85 / 1.2) / (1 - 0.85 / 1.2))]))
    assert float(ada.regularizer(11.0).detach()) == pytest.approx(1 + 0 + 0 + (1 - 0.5 ** 11), abs=1e-5)
    # the objective adds λ·f_reg only after the warm-up
    obj_terms = AdaRoundWeights(rounding=adaround.RoundingSchedule)
    obj_terms._sched, obj_terms._terms = s, [(ada, 1.0)]
    assert obj_terms.penalty(19) is None
    assert float(obj_terms.penalty(60).detach()) == pytest.approx(0.01 * float(ada.regularizer(11.0).detach()))


def test_optimised_weights_are_hard_rounded_on_the_grid():
    layer = _layer(seed=1, bits=2, split=5)           # split layer: both halves are rounded, each on its own grid
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, 4, 4, generator=g)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x, layer.weight, layer.bias)
    unit = Unit("layer", "layer")
    batches = ({"q": ((x[i:i + 16],), {}), "target": y[i:i + 16]} for i in [0, 16, 32, 48] * 20)
    objective = Objective([AdaRoundWeights(lr=1e-2, rounding=adaround.RoundingSchedule)], p=2.0)
    log = solve(unit, layer, None, batches, objective, 80, "cpu")
    assert log["iterations"] == 80 and log["trainables"] == layer.weight.numel()
    assert not any("alpha" in k or "adaround" in k for k in layer.state_dict())
    assert all(wq.adaround is None for wq, _ in layer.weight_quantizers())
    for wq, part in layer.weight_quantizers():
        codes = layer.weight[:, part] / wq.delta.view(-1, 1, 1, 1) + wq.zero.view(-1, 1, 1, 1)
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.round().min() >= 0 and codes.round().max() <= 3
    # nearest rounding of the stored grid weight reproduces it bitwise: an ordinary quantized layer now
    assert torch.equal(layer.quantized_weight(), layer.weight)
    assert torch.equal(fake_quant(layer.weight[:, :5], layer.weight_quantizer.delta.view(-1, 1, 1, 1),
                                  layer.weight_quantizer.zero.view(-1, 1, 1, 1), 4), layer.weight[:, :5])


def test_adaround_refuses_lora_layers():
    lin = QuantLinear.from_module(torch.nn.Linear(4, 3), LayerSpec(lora_rank=2))
    with pytest.raises(ValueError, match="LoRA"):
        adaround.attach(lin)
