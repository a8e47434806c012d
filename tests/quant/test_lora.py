import math

import pytest
import torch

from quant.layers import LayerSpec, QuantConv2d, QuantLinear
from quant.lora import LoRA


def _rand_(lora, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g))


def test_linear_delta():
    lora = LoRA((5, 7), 3, "linear", generator=torch.Generator().manual_seed(0))
    assert lora.lora_A.shape == (3, 7) and lora.lora_B.shape == (5, 3)
    assert torch.count_nonzero(lora.delta_weight()) == 0
    _rand_(lora, 1)
    exp = torch.zeros(5, 7)
    for o in range(5):
        for i in range(7):
            exp[o, i] = sum(lora.lora_B[o, r] * lora.lora_A[r, i] for r in range(3))
    assert torch.allclose(lora.delta_weight(), exp, atol=1e-6)


@pytest.mark.parametrize("kind", ["per_position", "shared_b"])
def test_conv_delta_vs_loop(kind):
    lora = LoRA((4, 6, 3, 3), 2, kind, generator=torch.Generator().manual_seed(0))
    assert lora.lora_A.shape == (2, 6, 3, 3)
    assert lora.lora_B.shape == ((4, 2, 3, 3) if kind == "per_position" else (4, 2, 1, 1))
    _rand_(lora, 2)
    A, B = lora.lora_A, lora.lora_B
    exp = torch.zeros(4, 6, 3, 3)
    for u in range(3):
        for v in range(3):
            b = B[:, :, u, v] if kind == "per_position" else B[:, :, 0, 0]
            exp[:, :, u, v] = b @ A[:, :, u, v]
    assert torch.allclose(lora.delta_weight(), exp, atol=1e-6)


def test_kaiming_uniform_bound_and_seeded():
    a1 = LoRA((8, 64, 3, 3), 32, "per_position", generator=torch.Generator().manual_seed(3)).lora_A
    a2 = LoRA((8, 64, 3, 3), 32, "per_position", generator=torch.Generator().manual_seed(3)).lora_A
    assert torch.equal(a1, a2)
    bound = 1.0 / (64 * 9) ** 0.5            # kaiming_uniform(a=√5): sqrt(6/((1+5)·fan_in))
    assert a1.abs().max() <= bound and a1.abs().max() > 0.9 * bound


def test_lora_is_exact_noop_at_start():
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    lin = torch.nn.Linear(6, 5)
    for layer in (QuantConv2d.from_module(conv, LayerSpec(lora_rank=4)),
                  QuantLinear.from_module(lin, LayerSpec(lora_rank=4))):
        plain = type(layer).from_module(conv if isinstance(layer, QuantConv2d) else lin, LayerSpec(lora_rank=0))
        assert torch.equal(layer.merged_weight(), plain.merged_weight())
        assert torch.equal(layer.quantized_weight(), plain.quantized_weight())


def _direct_draw(shape, seed):
    """A second computation of the init: PyTorch's own kaiming_uniform_ (a=√5) on a CPU tensor."""
    out = torch.empty(shape)
    return torch.nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))


def test_init_equals_a_direct_cpu_draw_on_every_device(test_device):
    with torch.device(test_device):
        lora = LoRA((8, 64, 3, 3), 32, "per_position", generator=torch.Generator().manual_seed(3))
    assert lora.lora_A.device.type == test_device.type and lora.lora_B.device.type == test_device.type
    assert torch.equal(lora.lora_A.detach().cpu(), _direct_draw((32, 64, 3, 3), 3))


def test_generator_never_fills_a_tensor_on_another_device(monkeypatch):
    """The CUDA crash: a CPU generator passed to uniform_ on a CUDA tensor raises. The weights here live on the
    meta device (a device that is not the generator's, as CUDA would be); every draw must happen on the CPU."""
    calls = []
    real = torch.Tensor.uniform_

    def checked(self, *args, generator=None, **kwargs):
        calls.append((self.device.type, None if generator is None else generator.device.type))
        assert generator is None or generator.device == self.device, \
            f"uniform_ with a {generator.device} generator on a {self.device} tensor"
        return real(self, *args, generator=generator, **kwargs)

    monkeypatch.setattr(torch.Tensor, "uniform_", checked)
    conv = torch.nn.Conv2d(6, 5, 3, device="meta")
    lin = torch.nn.Linear(6, 5, device="meta")
    calls.clear()
    gen = torch.Generator().manual_seed(0)
    layers = [QuantConv2d.from_module(conv, LayerSpec(lora_rank=4), gen),
              QuantLinear.from_module(lin, LayerSpec(lora_rank=4), gen)]
    assert calls == [("cpu", "cpu"), ("cpu", "cpu")]
    assert all(layer.lora.lora_A.device.type == "meta" for layer in layers)
