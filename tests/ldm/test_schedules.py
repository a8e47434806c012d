"""Schedule helpers against the schedules recorded from the original code (exact equality)."""
import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules.util import (make_beta_schedule, make_ddim_sampling_parameters,
                                               make_ddim_timesteps, noise_like)

from refdata import ldm_reference_dir, require

SETTINGS = ["linear_0.0015_0.0195", "linear_0.0015_0.0155", "linear_0.00085_0.012"]


@pytest.fixture(scope="module")
def schedules():
    return torch.load(require(ldm_reference_dir() / "vectors" / "schedules.pt"), weights_only=True)


def _alphas_cumprod_f32(entry):
    betas = make_beta_schedule("linear", 1000, linear_start=entry["linear_start"], linear_end=entry["linear_end"])
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


@pytest.mark.parametrize("setting", SETTINGS)
def test_linear_betas_and_cumprod_exact(schedules, setting):
    entry = schedules[setting]
    betas = make_beta_schedule("linear", 1000, linear_start=entry["linear_start"], linear_end=entry["linear_end"])
    assert isinstance(betas, np.ndarray) and betas.dtype == np.float64
    assert torch.equal(torch.from_numpy(betas), entry["betas_float64"])
    cumprod = np.cumprod(1.0 - betas, axis=0)
    assert torch.equal(torch.from_numpy(cumprod), entry["alphas_cumprod_float64"])
    buffers = entry["buffers_float32"]
    assert torch.equal(torch.tensor(betas, dtype=torch.float32), buffers["betas"])
    assert torch.equal(_alphas_cumprod_f32(entry), buffers["alphas_cumprod"])


@pytest.mark.parametrize("setting", SETTINGS)
def test_ddim_schedules_exact(schedules, setting):
    entry = schedules[setting]
    alphacums = _alphas_cumprod_f32(entry)  # what the sampler passes: the model's float32 buffer
    assert len(entry["ddim"]) == 22  # 11 step counts x eta in {0, 1}
    for key, rec in entry["ddim"].items():
        steps = make_ddim_timesteps("uniform", rec["S"], 1000, verbose=False)
        assert steps.dtype == np.int64 and len(steps) == rec["n_steps_actual"], key
        assert torch.equal(torch.from_numpy(steps), rec["ddim_timesteps"]), key
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphacums, steps, rec["eta"], verbose=False)
        # dtypes as the original sampler holds them
        assert isinstance(alphas, torch.Tensor) and alphas.dtype == torch.float32, key
        assert isinstance(alphas_prev, np.ndarray) and alphas_prev.dtype == np.float64, key
        assert isinstance(sigmas, torch.Tensor) and sigmas.dtype == torch.float64, key
        assert torch.equal(alphas, rec["ddim_alphas_f32"]), key
        assert torch.equal(torch.from_numpy(alphas_prev), rec["ddim_alphas_prev_f64"]), key
        assert torch.equal(sigmas, rec["ddim_sigmas_f64"]), key
        assert torch.equal(sigmas.float(), rec["ddim_sigmas_f32"]), key
        assert torch.equal(torch.tensor(alphas_prev, dtype=torch.float32), rec["ddim_alphas_prev_f32"]), key
        sqrt_one_minus = torch.from_numpy(np.sqrt((1.0 - alphas).numpy()))  # what the sampler registers
        assert torch.equal(sqrt_one_minus, rec["ddim_sqrt_one_minus_alphas_f32"]), key


def test_ddim_uniform_closed_form():
    # range(0, 1000, 1000 // S) + 1: S=7 gives 8 steps, S=30 gives 31.
    assert make_ddim_timesteps("uniform", 5, 1000, verbose=False).tolist() == [1, 201, 401, 601, 801]
    assert len(make_ddim_timesteps("uniform", 7, 1000, verbose=False)) == 8
    assert len(make_ddim_timesteps("uniform", 30, 1000, verbose=False)) == 31
    # S = T shifts the last step to T, which the original then fails to index
    steps = make_ddim_timesteps("uniform", 1000, 1000, verbose=False)
    with pytest.raises(IndexError):
        make_ddim_sampling_parameters(torch.ones(1000), steps, 0.0, verbose=False)


def test_ddim_quad_example(schedules):
    for S, ref in schedules["make_ddim_timesteps_quad_example"].items():
        steps = make_ddim_timesteps("quad", int(S), 1000, verbose=False)
        assert torch.equal(torch.from_numpy(steps.astype(np.int64)), ref)


def test_eta_zero_sigmas_are_zero_and_eta_one_matches_ddpm_posterior():
    betas = make_beta_schedule("linear", 1000, linear_start=0.0015, linear_end=0.0195)
    ac = np.cumprod(1.0 - betas)
    steps = np.arange(1000)[1:]  # consecutive steps: DDIM eta=1 sigma^2 equals the DDPM posterior variance
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(ac, steps, 1.0, verbose=False)
    posterior_var = betas[steps] * (1 - ac[steps - 1]) / (1 - ac[steps])
    np.testing.assert_allclose(sigmas[1:] ** 2, posterior_var[1:], rtol=1e-10)
    sig0, _, _ = make_ddim_sampling_parameters(ac, steps, 0.0, verbose=False)
    assert np.all(sig0 == 0)


def test_other_beta_schedules_closed_form():
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 5, 0.1, 0.5), [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(make_beta_schedule("sqrt", 3, 0.04, 0.16), np.sqrt([0.04, 0.1, 0.16]))
    cos = make_beta_schedule("cosine", 1000)
    assert cos.shape == (1000,) and np.all(cos >= 0) and np.all(cos <= 0.999)
    s = 8e-3
    f = lambda t: np.cos((t / 1000 + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(np.cumprod(1 - cos)[:500], (f(np.arange(1, 501)) / f(0)), rtol=1e-9)


def test_noise_like_uses_global_rng_in_order():
    torch.manual_seed(3)
    a, b = noise_like((2, 3), "cpu"), noise_like((2, 3), "cpu")
    torch.manual_seed(3)
    assert torch.equal(a, torch.randn(2, 3)) and torch.equal(b, torch.randn(2, 3))
    r = noise_like((4, 2), "cpu", repeat=True)
    assert r.shape == (4, 2) and torch.equal(r[0], r[3])
