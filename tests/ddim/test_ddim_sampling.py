"""Samplers, transforms and the PixelDiffusion surface, checked against closed forms and second computations."""
import numpy as np
import pytest
import torch

from ddim.config import model_config
from ddim.datasets import data_transform, inverse_data_transform
from ddim.functions.denoising import compute_alpha, ddpm_steps, generalized_steps, step_pairs
from ddim.pipeline import PixelDiffusion
from ddim.runners.diffusion import get_beta_schedule, timestep_sequence
from ldm.util import UserError

TINY = dict(type="simple", in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16],
            dropout=0.0, var_type="fixedlarge", ema_rate=0.9999, ema=True, resamp_with_conv=True)


def _config():
    cfg = model_config(TINY, 32)
    cfg.diffusion.beta_schedule, cfg.diffusion.beta_start, cfg.diffusion.beta_end = "linear", 1e-4, 0.02
    return cfg


@pytest.fixture(scope="module")
def pixel():
    torch.manual_seed(0)
    return PixelDiffusion(_config()).eval()


class ConstantEps(torch.nn.Module):
    """ε(x, t) = c·x + d: simple enough that one step has a float64 closed form."""

    def __init__(self, c=0.3, d=0.1):
        super().__init__()
        self.c, self.d, self.calls = c, d, []

    def forward(self, x, t):
        self.calls.append(t.clone())
        return self.c * x + self.d


def _alpha_bar64():
    return np.concatenate([[1.0], np.cumprod(1.0 - get_beta_schedule(
        "linear", beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000).astype(np.float32).astype(np.float64))])


def test_step_pairs_quad100():
    pairs = step_pairs(timestep_sequence("quad", 100, 1000))
    assert pairs[:2] == [(800, 783), (783, 768)]
    assert pairs[-8:] == [(3, 2), (2, 2), (2, 1), (1, 0), (0, 0), (0, 0), (0, 0), (0, -1)]


def test_compute_alpha_minus_one_is_one():
    b = torch.linspace(1e-4, 0.02, 1000)
    a = compute_alpha(b, torch.tensor([-1, 0, 999]))
    assert a.shape == (3, 1, 1, 1) and float(a[0]) == 1.0
    assert float(a[1]) == pytest.approx(1 - 1e-4, rel=1e-7)
    assert float(a[2]) == pytest.approx(float(torch.prod(1 - b.double())), rel=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_generalized_steps_closed_form(eta):
    b = torch.from_numpy(get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02,
                                           num_diffusion_timesteps=1000)).float()
    seq = [0, 300, 700]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    model = ConstantEps()
    torch.manual_seed(5)
    xs, x0s = generalized_steps(x, seq, model, b, eta=eta)
    torch.manual_seed(5)
    noises = [torch.randn_like(x).double() for _ in seq]
    ab = _alpha_bar64()
    xt = x.double()
    for k, (i, j) in enumerate([(700, 300), (300, 0), (0, -1)]):
        at, an = ab[i + 1], ab[j + 1]
        eps = 0.3 * xt + 0.1
        x0 = (xt - np.sqrt(1 - at) * eps) / np.sqrt(at)
        c1 = eta * np.sqrt((1 - at / an) * (1 - an) / (1 - at))
        c2 = np.sqrt(1 - an - c1 ** 2)
        xt = np.sqrt(an) * x0 + c1 * noises[k] + c2 * eps
        torch.testing.assert_close(x0s[k].double(), x0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xs[k + 1].double(), xt, rtol=1e-5, atol=1e-5)
    assert [float(t[0]) for t in model.calls] == [700.0, 300.0, 0.0]
    assert all(t.dtype == torch.float32 for t in model.calls)


def test_ddpm_steps_closed_form():
    b = torch.from_numpy(get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02,
                                           num_diffusion_timesteps=1000)).float()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(9)
    xs, x0s = ddpm_steps(x, [0, 500], ConstantEps(), b)
    torch.manual_seed(9)
    n1, _ = torch.randn_like(x).double(), torch.randn_like(x)
    ab = _alpha_bar64()
    at, an = ab[501], ab[1]
    beta = 1 - at / an
    xt = x.double()
    x0 = ((xt - np.sqrt(1 - at) * (0.3 * xt + 0.1)) / np.sqrt(at)).clamp(-1, 1)
    mean = (np.sqrt(an) * beta * x0 + np.sqrt(1 - beta) * (1 - an) * xt) / (1 - at)
    torch.testing.assert_close(xs[1].double(), mean + np.sqrt(beta) * n1, rtol=1e-5, atol=1e-5)
    # last step (t = 0 -> -1): no noise, x = clipped x0 prediction
    x1 = xs[1].double()
    at0 = ab[1]
    x0_last = ((x1 - np.sqrt(1 - at0) * (0.3 * x1 + 0.1)) / np.sqrt(at0)).clamp(-1, 1)
    torch.testing.assert_close(xs[2].double(), x0_last, rtol=1e-5, atol=1e-5)
    assert float(x0s[1].abs().max()) <= 1.0


def test_skip_sequence_errors_and_uniform_remainder():
    assert timestep_sequence("uniform", 30, 1000) == list(range(0, 1000, 33))  # 31 values, as the original
    with pytest.raises(UserError):
        timestep_sequence("cosine", 10, 1000)
    with pytest.raises(UserError):
        timestep_sequence("uniform", 0, 1000)


def test_data_transforms():
    cfg = _config()
    cfg.data.rescaled, cfg.data.logit_transform = True, False
    cfg.data.uniform_dequantization = cfg.data.gaussian_dequantization = False
    x = torch.rand(2, 3, 4, 4)
    y = data_transform(cfg, x)
    torch.testing.assert_close(y, 2 * x - 1)
    torch.testing.assert_close(inverse_data_transform(cfg, y), x)
    assert float(inverse_data_transform(cfg, torch.tensor([-3.0, 3.0])).min()) == 0.0
    cfg.data.uniform_dequantization = True
    a = data_transform(cfg, x, generator=torch.Generator().manual_seed(3))
    b = data_transform(cfg, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, y)
    assert float((a - (2 * (x * 255 / 256) - 1)).min()) >= 0 and float((a - (2 * (x * 255 / 256) - 1)).max()) < 2 / 256


def test_pixel_sample_equals_generalized_steps(pixel):
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(11)
    xs, _ = generalized_steps(x_T, pixel.timestep_sequence(10, "quad"), pixel.model.diffusion_model, pixel.betas,
                              eta=0.5)
    torch.manual_seed(11)
    x = pixel.sample(x_T, 10, skip_type="quad", eta=0.5)
    assert torch.equal(x, xs[-1])
    # with a generator the noise comes from it: reproducible, independent of the global RNG
    a = pixel.sample(x_T, 5, "uniform", eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    b = pixel.sample(x_T, 5, "uniform", eta=1.0, generator=torch.Generator().manual_seed(0))
    c = pixel.sample(x_T, 5, "uniform", eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pixel_surface(pixel):
    assert pixel.model.diffusion_model is pixel.model.diffusion_model and pixel.cond_stage_model is None
    assert pixel.conditioning_key is None and pixel.model.conditioning_key is None
    assert (pixel.channels, pixel.image_size, pixel.num_timesteps) == (3, 32, 1000)
    assert pixel.device == torch.device("cpu")
    b = pixel.betas
    assert b.dtype == torch.float32 and torch.equal(b, torch.from_numpy(get_beta_schedule(
        "linear", beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000)).float())
    ts = torch.tensor([0, 1, 500, 999])
    assert torch.equal(pixel.alphas_cumprod[ts], compute_alpha(b, ts).flatten())
    assert list(pixel.state_dict()) == ["model.diffusion_model." + k for k in pixel.model.diffusion_model.state_dict()]
    x = torch.randn(2, 3, 32, 32)
    assert pixel.decode_first_stage(x) is x
    t = torch.tensor([3.0, 3.0])
    with torch.no_grad():
        assert torch.equal(pixel.apply_model(x, t), pixel.model.diffusion_model(x, t))
    noise = torch.randn_like(x)
    tl = torch.tensor([10, 900])
    expected = (pixel.alphas_cumprod[tl].sqrt().view(-1, 1, 1, 1) * x
                + (1 - pixel.alphas_cumprod[tl]).sqrt().view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(pixel.q_sample(x, tl, noise), expected)


def test_swapped_network_recorder_callback_and_step_scope(pixel):
    import contextlib

    saved = pixel.model.diffusion_model
    fake = ConstantEps()
    pixel.model.diffusion_model = fake  # what quant code does with a quantized network
    scopes, steps = [], []

    @contextlib.contextmanager
    def scope(k):
        scopes.append(("enter", k))
        yield
        scopes.append(("exit", k))

    try:
        x_T = torch.randn(2, 3, 32, 32)
        with pixel.record_unet_inputs() as rec:
            out = pixel.sample(x_T, 10, "quad", callback=steps.append, step_scope=scope)
    finally:
        pixel.model.diffusion_model = saved
    seq = timestep_sequence("quad", 10, 1000)
    assert [float(t[0]) for t in fake.calls] == list(reversed(seq))
    assert [e["t"].tolist() for e in rec.entries] == [[t, t] for t in reversed(seq)]
    assert torch.equal(rec.entries[0]["x"], x_T) and rec.entries[0]["context"] is None
    assert scopes == [(s, k) for k in range(10) for s in ("enter", "exit")]
    assert [s["i"] for s in steps] == list(range(10)) and torch.equal(steps[-1]["x_next"], out)
    assert all(torch.equal(steps[k]["x_next"], steps[k + 1]["x"]) for k in range(9))
    assert steps[-1]["t_next"] == -1 and torch.equal(steps[-1]["x0"], out)
