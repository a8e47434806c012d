
import pytest
import torch

from quant.quantizer import fake_quant, fake_quant_autograd, init_max, init_mse, round_ste


def test_grid_values_closed_form(test_device):
    delta, zero = torch.tensor(0.5, device=test_device), torch.tensor(1.0, device=test_device)  # 2-bit: (q-1)*0.5
    x = torch.tensor([-2.0, -0.5, -0.26, -0.24, 0.0, 0.3, 0.74, 0.76, 1.0, 5.0], device=test_device)
    expected = torch.tensor([-0.5, -0.5, -0.5, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0], device=test_device)
    assert torch.equal(fake_quant(x, delta, zero, 4), expected)


def test_float_zero_point_is_not_rounded():
    x = torch.tensor([0.0, 0.2])
    out = fake_quant(x, torch.tensor(0.1), torch.tensor(0.4), 16)
    # round(x/Δ) + z then minus z: a float z cancels exactly inside the range
    assert torch.allclose(out, torch.tensor([0.0, 0.2]))
    # at the lower clip the value is -z·Δ, which needs the float z
    assert torch.allclose(fake_quant(torch.tensor([-1.0]), torch.tensor(0.1), torch.tensor(0.4), 16),
                          torch.tensor([-0.04]))


def test_round_ste_gradient_is_identity():
    x = torch.tensor([0.2, 1.7], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2))


def test_ste_gradients_hand_derived(test_device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, generator=g) * 2).to(test_device).requires_grad_()
    delta = torch.tensor(0.37, requires_grad=True, device=test_device)
    zero = torch.tensor(1.3, requires_grad=True, device=test_device)
    hi = 7.0
    w = torch.randn(200, generator=g).to(test_device)  # upstream gradient
    (fake_quant(x, delta, zero, 8) * w).sum().backward()
    with torch.no_grad():
        t = x / delta
        v = torch.round(t) + zero
        above, below = v > hi, v < 0
        inside = ~(above | below)
        assert above.any() and below.any() and inside.any()
        exp_dx = w * inside
        exp_ddelta = (w * torch.where(inside, torch.round(t) - t, torch.where(above, hi - zero, -zero))).sum()
        exp_dz = (w * (~inside) * -delta).sum()
    assert torch.allclose(x.grad, exp_dx)
    assert torch.allclose(delta.grad, exp_ddelta, rtol=1e-5)
    assert torch.allclose(zero.grad, exp_dz, rtol=1e-5)


def test_fused_matches_relu_formulation_per_channel_mixed_bits(test_device):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, 3, 3, generator=g).to(test_device)
    bits = torch.tensor([1, 2, 3, 2, 4, 3], device=test_device)
    levels = (2.0 ** bits).view(-1, 1, 1, 1)
    grads = []
    for fn in (fake_quant, fake_quant_autograd):
        x = w.clone().requires_grad_()
        d = (torch.rand(6, generator=torch.Generator().manual_seed(2)) * 0.3 + 0.05).to(test_device).requires_grad_()
        z = (torch.rand(6, generator=torch.Generator().manual_seed(3)) * 2).to(test_device).requires_grad_()
        out = fn(x, d.view(-1, 1, 1, 1), z.view(-1, 1, 1, 1), levels)
        (out * w).sum().backward()
        grads.append((out.detach(), x.grad, d.grad, z.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_max_init_closed_form():
    x = torch.tensor([[0.5, 1.5, 3.0], [-2.0, -1.0, -0.5]])
    d, z = init_max(x, 2, per_channel=True)
    assert torch.allclose(d, torch.tensor([1.0, 2.0 / 3.0]))       # ranges [0,3] and [-2,0]
    assert torch.equal(z, torch.tensor([0.0, 3.0]))
    d, z = init_max(x, 3)
    assert torch.allclose(d, torch.tensor(5.0 / 7.0)) and z.item() == round(2.0 / (5.0 / 7.0))


def _brute_mse(x, n_bits):
    """Independent per-tensor search written from the spec text, one candidate at a time."""
    lo0, hi0 = x.min().item(), x.max().item()
    best = None
    for i in range(80):
        lo, hi = lo0 * (1 - 0.01 * i), hi0 * (1 - 0.01 * i)
        d = (hi - lo) / (2 ** n_bits - 1)
        z = round(-lo / d)
        xq = (torch.clamp(torch.round(x / d) + z, 0, 2 ** n_bits - 1) - z) * d
        err = ((x - xq).abs() ** 2.4).mean().item()
        if best is None or err < best[0]:
            best = (err, d, z)
    return best[1], best[2]


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_init_matches_brute_force(bits, test_device):
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randn(500, generator=g), torch.tensor([9.0, -4.0])])  # outliers make shrinking pay
    d, z = init_mse(x.to(test_device), bits)
    bd, bz = _brute_mse(x.double(), bits)
    assert d.item() == pytest.approx(bd, rel=1e-5) and z.item() == bz
    # per channel = the per-tensor procedure on each slice
    rows = torch.stack([x, x * 0.1 + 1.0, -x.abs()])
    dc, zc = init_mse(rows.to(test_device), bits, per_channel=True)
    for r in range(3):
        bd, bz = _brute_mse(rows[r].double(), bits)
        assert dc[r].item() == pytest.approx(bd, rel=1e-5) and zc[r].item() == bz


def test_mixed_bits_equals_three_masked_quantizers_summed():
    """Released formulation: Σ_g Q_g(mask_g ⊙ W), each Q_g with placeholders 0.005 on channels it does not own."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(10, 8, 3, 3, generator=g)
    bits = torch.tensor([1, 2, 3, 2, 2, 3, 1, 2, 2, 2])
    delta, zero = init_mse(w, bits, per_channel=True)
    view = (-1, 1, 1, 1)
    ours = fake_quant(w, delta.view(view), zero.view(view), (2.0 ** bits).view(view))
    total = torch.zeros_like(w)
    for b in (1, 2, 3):
        own = bits == b
        mask = own.view(view).float()
        d_g, z_g = init_mse(w[own], b, per_channel=True)      # init over the owned channels only
        d_full = torch.full((10,), 0.005)
        z_full = torch.full((10,), 0.005)
        d_full[own], z_full[own] = d_g, z_g
        total += fake_quant(mask * w, d_full.view(view), z_full.view(view), 2 ** b)
    assert torch.allclose(ours, total, atol=1e-6)


def test_constant_slice_does_not_divide_by_zero():
    x = torch.zeros(3, 5)
    for init in (init_max, init_mse):
        d, z = init(x, 2, per_channel=True)
        assert torch.isfinite(d).all() and torch.isfinite(z).all()
        assert torch.equal(fake_quant(x, d.view(-1, 1), z.view(-1, 1), 4), x)
