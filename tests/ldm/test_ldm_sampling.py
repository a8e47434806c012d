"""Tiny LatentDiffusion models (cin256-v2 / SD v1 structure) against the original DDIM / PLMS runs."""
import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from refdata import build_tiny_ldm, close, close_latent


@pytest.fixture(scope="module")
def cin():
    return build_tiny_ldm("e_ldm_cin_tiny.sampling")


@pytest.fixture(scope="module")
def sd():
    return build_tiny_ldm("f_ldm_sd_tiny.sampling")


def _capture_calls(model):
    """Record every apply_model call (x, t, out) by wrapping the bound method on the instance."""
    calls, orig = [], model.apply_model

    def wrapped(x, t, c, *a, **k):
        out = orig(x, t, c, *a, **k)
        calls.append({"x": x.clone(), "t": t.clone(), "out": out.clone()})
        return out

    model.apply_model = wrapped
    return calls, lambda: model.__dict__.pop("apply_model")


def _run(model, run, c, uc, use_generator=False):
    sampler = {"ddim": DDIMSampler, "plms": PLMSSampler}[run["sampler"]](model)
    scale = run["unconditional_guidance_scale"]
    generator = None
    if use_generator:
        generator = torch.Generator().manual_seed(run["torch_seed_before_sample"])
    else:
        torch.manual_seed(run["torch_seed_before_sample"])
    calls, restore = _capture_calls(model)
    try:
        samples, inter = sampler.sample(S=run["S"], batch_size=run["batch_size"], shape=run["shape"],
                                        conditioning=c, eta=run["eta"], x_T=run["x_T"].clone(), verbose=False,
                                        unconditional_guidance_scale=scale,
                                        unconditional_conditioning=uc if scale != 1.0 else None,
                                        log_every_t=1, generator=generator, progress=False)
    finally:
        restore()
    return sampler, samples, inter, calls


def _check_run(sampler, samples, inter, calls, run):
    sched = run["schedule"]
    assert np.array_equal(sampler.ddim_timesteps, sched["ddim_timesteps"].numpy())
    assert sampler.ddim_alphas.dtype == torch.float32 and sampler.ddim_sigmas.dtype == torch.float64
    assert isinstance(sampler.ddim_alphas_prev, np.ndarray) and sampler.ddim_alphas_prev.dtype == np.float64
    for ours, key in ((sampler.ddim_alphas, "ddim_alphas"), (sampler.ddim_sigmas, "ddim_sigmas"),
                      (sampler.ddim_sqrt_one_minus_alphas, "ddim_sqrt_one_minus_alphas")):
        assert torch.equal(torch.as_tensor(ours).double(), sched[key]["values"]), key
    assert np.array_equal(sampler.ddim_alphas_prev, sched["ddim_alphas_prev"]["values"].numpy())

    assert len(calls) == len(run["model_calls"])
    for ours, ref in zip(calls, run["model_calls"]):
        assert torch.equal(ours["t"], ref["t"])
        close_latent(ours["x"], ref["x"])
        close(ours["out"], ref["out"])
    assert len(inter["x_inter"]) == run["x_inter"].shape[0]
    for ours, ref in zip(inter["x_inter"], run["x_inter"]):
        close_latent(ours, ref)
    assert len(inter["pred_x0"]) == run["pred_x0"].shape[0] + 1  # + the x_T placeholder
    for ours, ref in zip(inter["pred_x0"][1:], run["pred_x0"]):
        close_latent(ours, ref)
    close_latent(samples, run["samples"])


CIN_RUNS = ["ddim_S5_eta0_cfg3", "ddim_S5_eta1_cfg3", "ddim_S5_eta0_noguidance", "plms_S5_cfg3"]


@pytest.mark.parametrize("name", CIN_RUNS)
def test_cin_tiny_sampling_runs(cin, name):
    record, model = cin
    run = record["runs"][name]
    with torch.no_grad():
        c = model.get_learned_conditioning({"class_label": record["class_embedder"]["labels"]})
        uc = model.get_learned_conditioning({"class_label": record["class_embedder"]["uc_labels"]})
    sampler, samples, inter, calls = _run(model, run, c, uc)
    _check_run(sampler, samples, inter, calls, run)
    # noise drawn from the global RNG in the original order (also at eta=0)
    torch.manual_seed(run["torch_seed_before_sample"])
    draws = torch.stack([torch.randn(run["x_T"].shape) for _ in range(run["step_noise"].shape[0])])
    assert torch.equal(draws, run["step_noise"])
    x_samples = model.decode_first_stage(samples)
    close(x_samples, run["decoded"])
    close(model.decode_first_stage(samples, force_not_quantize=True), run["decoded_force_not_quantize"])


def test_cin_tiny_generator_reproduces_global_rng_run(cin):
    record, model = cin
    run = record["runs"]["ddim_S5_eta1_cfg3"]
    with torch.no_grad():
        c = model.get_learned_conditioning({"class_label": record["class_embedder"]["labels"]})
        uc = model.get_learned_conditioning({"class_label": record["class_embedder"]["uc_labels"]})
    torch.manual_seed(12345)
    before = torch.random.get_rng_state()
    _, samples, _, _ = _run(model, run, c, uc, use_generator=True)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG was not touched
    close_latent(samples, run["samples"])


@torch.no_grad()
def test_cin_tiny_conditioning_first_stage_and_q_sample(cin):
    record, model = cin
    ce = record["class_embedder"]
    c = model.get_learned_conditioning({"class_label": ce["labels"]})
    assert c.shape == (2, 1, 32)
    close(c, ce["c"], rtol=0, atol=0)
    close(model.get_learned_conditioning({"class_label": ce["uc_labels"]}), ce["uc"], rtol=0, atol=0)
    fs = record["first_stage"]
    z = model.get_first_stage_encoding(model.encode_first_stage(fs["image"]))
    close(z, fs["z"])
    close(model.decode_first_stage(fs["z"]), fs["decode_first_stage_of_z"])
    close(model.decode_first_stage(fs["z"], force_not_quantize=True), fs["decode_first_stage_of_z_force_not_quantize"])
    q = record["q_sample"]
    close(model.q_sample(q["x0"], q["t"], q["noise"]), q["x_t"], rtol=0, atol=1e-6)
    close(model.predict_start_from_noise(q["x_t"], q["t"], q["noise"]), q["predict_start_from_noise"])


@pytest.mark.parametrize("name", ["plms_S5_cfg7.5", "ddim_S5_eta0_cfg7.5"])
def test_sd_tiny_sampling_runs(sd, name):
    record, model = sd
    run = record["runs"][name]
    c, uc = record["context"]["c"], record["context"]["uc"]
    with torch.no_grad():  # cond stage is nn.Identity: the learned conditioning is the context itself
        assert torch.equal(model.get_learned_conditioning(c), c)
    sampler, samples, inter, calls = _run(model, run, c, uc)
    _check_run(sampler, samples, inter, calls, run)
    close(model.decode_first_stage(samples), run["decoded"])


@torch.no_grad()
def test_sd_tiny_img2img(sd):
    record, model = sd
    ref = record["img2img"]
    c, uc = record["context"]["c"], record["context"]["uc"]
    posterior = model.encode_first_stage(ref["image"])
    close(posterior.mean, ref["posterior_mean"])
    close(posterior.std, ref["posterior_std"])
    init_latent = model.scale_factor * posterior.sample(noise=ref["posterior_eps"])
    close(init_latent, ref["init_latent"])
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=ref["ddim_steps"], ddim_eta=0.0, verbose=False)
    t_enc = int(ref["strength"] * ref["ddim_steps"])
    assert t_enc == ref["t_enc"]
    z_enc = sampler.stochastic_encode(ref["init_latent"], torch.tensor([t_enc] * 2),
                                      noise=ref["stochastic_encode_noise"])
    close_latent(z_enc, ref["z_enc"])
    calls, restore = _capture_calls(model)
    try:
        torch.manual_seed(0)  # eta=0: the drawn noise is multiplied by 0
        samples = sampler.decode(ref["z_enc"], c, t_enc, unconditional_guidance_scale=7.5,
                                 unconditional_conditioning=uc, progress=False)
    finally:
        restore()
    assert [int(cl["t"][0]) for cl in calls] == [401, 201, 1]
    for ours, r in zip(calls, ref["model_calls"]):
        assert torch.equal(ours["t"], r["t"])
        close_latent(ours["x"], r["x"])
        close(ours["out"], r["out"])
    close_latent(samples, ref["samples"])
    close(model.decode_first_stage(samples), ref["decoded"])
