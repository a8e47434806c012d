import numpy as np
import pytest
import torch
from scipy import stats

from quant.methods import omq


def test_kurtosis_plain_pearson_with_unbiased_sigma():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 4, 3, 3, generator=g)
    w[2] = w[2] ** 3                                  # heavy-tailed row
    rows = w.reshape(7, -1).double().numpy()
    n = rows.shape[1]
    # scipy's biased Pearson kurtosis is m4 / m2^2 with the plain-mean m2; the spec divides by the unbiased σ^4,
    # i.e. m4 / (m2 · n/(n-1))^2
    expected = stats.kurtosis(rows, axis=1, fisher=False, bias=True) * ((n - 1) / n) ** 2
    assert np.allclose(omq.kurtosis(w).double().numpy(), expected, rtol=1e-5)
    assert omq.kurtosis(w)[2] > 3 * omq.kurtosis(w)[0]


def test_allocation_keeps_average_and_ranks_by_kappa():
    kappa = torch.tensor([5.0, 1.0, 9.0, 3.0, 2.0, 7.0, 4.0, 0.5, 6.0, 8.0])
    bits = omq.allocate(kappa, 2, 3)
    assert bits.tolist() == [3, 2, 4, 3, 3, 3, 3, 2, 3, 4]   # top-2 κ (9, 8) -> 4; bottom-2 (0.5, 1) -> 2
    assert bits.double().mean().item() == 3.0
    plus = omq.allocate_plus(kappa, 2)
    assert plus.tolist().count(3) == 1 and plus[2] == 3 and plus.double().mean().item() == pytest.approx(2.1)


def test_worked_example_cin_resblock_conv():
    """MPQ-DM.md §7.5: Cout 960, b = 2."""
    assert omq.candidates(960) == [0, 96, 192, 288, 384, 480]
    assert omq.candidates(960, "released") == [0, 96]
    assert omq.candidates(9) == [0] and omq.candidates(9, "released") == [0]
    kappa = torch.randn(960, generator=torch.Generator().manual_seed(1))
    b96 = omq.allocate(kappa, 96, 2)
    assert (b96 == 3).sum() == 96 and (b96 == 1).sum() == 96 and (b96 == 2).sum() == 768
    b480 = omq.allocate(kappa, 480, 2)
    assert (b480 == 2).sum() == 0 and (b480 == 3).sum() == 480
    for m in omq.candidates(960):
        assert omq.allocate(kappa, m, 2).double().mean().item() == 2.0
    assert omq.allocate_plus(kappa, 2).double().mean().item() == pytest.approx(2.1)


def test_smoothing_keeps_fp_output_and_formula():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 5, 5, generator=g) * torch.tensor([1, 10, 0.1, 3, 1, 50.0]).view(1, -1, 1, 1)
    w = torch.randn(8, 6, 3, 3, generator=g)
    s = omq.smoothing_factors(x, w)
    exp = (x.abs().amax(dim=(0, 2, 3)) / w.abs().amax(dim=(0, 2, 3))).sqrt()
    assert torch.allclose(s, exp)
    y = torch.nn.functional.conv2d(x, w)
    y_s = torch.nn.functional.conv2d(x / s.view(1, -1, 1, 1), w * s.view(1, -1, 1, 1))
    assert torch.allclose(y, y_s, atol=1e-4)
    # linear: max over batch and tokens; a zero weight column stays finite thanks to the ε clamp
    xl = torch.randn(2, 7, 6, generator=g)
    wl = torch.randn(3, 6, generator=g)
    wl[:, 1] = 0
    sl = omq.smoothing_factors(xl, wl)
    assert torch.isfinite(sl).all()
    assert torch.allclose(sl[0], (xl[..., 0].abs().max() / wl[:, 0].abs().max()).sqrt())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_never_worse_than_m0(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 16, 3, 3, generator=g)
    w[:6] *= torch.rand(6, 1, 1, 1, generator=g) * 4      # channels with larger range
    w[:, :, 1, 1] += (torch.rand(40, 16, generator=g) > 0.97) * 5.0   # outliers
    x = torch.randn(3, 16, 6, 6, generator=g)
    s = omq.smoothing_factors(x, w)
    ws = w * s.view(1, -1, 1, 1)
    op = lambda inp, wt: torch.nn.functional.conv2d(inp, wt, padding=1)
    xs = x / s.view(1, -1, 1, 1)
    m, bits, errors = omq.search(x, ws, xs, op(x, w), op, 2, omq.candidates(40))
    assert len(errors) == 6 and errors[[0, 4, 8, 12, 16, 20].index(m)] == min(errors)
    assert errors[[0, 4, 8, 12, 16, 20].index(m)] <= errors[0]
    # strict improvement: the first minimum wins, so an earlier equal error is never displaced
    assert errors.index(min(errors)) == [0, 4, 8, 12, 16, 20].index(m)
    assert bits.double().mean().item() == 2.0
