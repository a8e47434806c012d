"""Numeric agreement with the original ermongroup/ddim code (reference/ddim, tolerances of its README)."""
import numpy as np
import pytest
import torch

from ddim.functions.denoising import compute_alpha, generalized_steps
from ddim.runners.diffusion import get_beta_schedule, timestep_sequence
from ddimref import build_reference_model, load_ddim_json, load_ddim_record


@pytest.mark.parametrize("name", ["a_model_tiny", "a2_model_tiny_avgpool"])
def test_model_forward_matches_original(name):
    record = load_ddim_record(name)
    model = build_reference_model(record)
    assert record["t"].is_floating_point()
    with torch.no_grad():
        out = model(record["x"], record["t"])
    torch.testing.assert_close(out, record["out"], rtol=1e-4, atol=1e-4)


def test_generalized_steps_quad100_eta0_matches_original():
    record = load_ddim_record("b_sampling_quad100_eta0")
    model = build_reference_model(record)
    betas = torch.from_numpy(get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02,
                                               num_diffusion_timesteps=1000)).float()
    assert torch.equal(betas, record["betas"])
    seq = timestep_sequence(record["skip_type"], record["timesteps"], 1000)
    assert seq == record["seq"]

    torch.manual_seed(record["torch_seed_before_sample"])
    xs, x0_preds = generalized_steps(record["x_T"], seq, model, betas, eta=record["eta"])
    rng_after = torch.get_rng_state()
    assert len(xs) == len(seq) + 1 and len(x0_preds) == len(seq)
    ref_final = record["x_final"]
    torch.testing.assert_close(xs[-1], ref_final, rtol=0, atol=1e-5 * float(ref_final.abs().max()))
    torch.testing.assert_close(x0_preds[0], record["x0_first"], rtol=1e-4, atol=1e-4)
    image = torch.clamp((xs[-1] + 1) / 2, 0, 1)
    torch.testing.assert_close(image, record["image"], rtol=0, atol=1e-5 * float(ref_final.abs().max()))

    # one randn_like per step, in step order, from the global RNG: the stored draws and the RNG state after
    torch.manual_seed(record["torch_seed_before_sample"])
    draws = torch.stack([torch.randn_like(record["x_T"]) for _ in seq])
    assert torch.equal(draws, record["noises"])
    assert torch.equal(rng_after, torch.get_rng_state())


def test_schedules_exact():
    ref = load_ddim_json("schedules.json")
    for name, values in ref["seqs"].items():
        kind, steps = name.split("_")
        assert timestep_sequence(kind, int(steps), 1000) == values, name
    assert len(set(ref["seqs"]["quad_100"])) == 96
    betas64 = get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000)
    assert betas64.dtype == np.float64
    assert [betas64[0], betas64[-1]] == ref["betas_linear_first_last"]
    alpha_bar = np.cumprod(1.0 - betas64)
    betas32 = torch.from_numpy(betas64).float()
    for t, value in ref["alpha_bar_at"].items():
        assert alpha_bar[int(t)] == value, t  # float64, exact
        # the sampler's float32 cumprod agrees to float32 rounding
        got = float(compute_alpha(betas32, torch.tensor([int(t)])))
        assert got == pytest.approx(value, rel=2e-6), t
