"""Repeated timesteps (TXT2IMG_CIFAR.md B.3, quant.step): per-step activation quantizers are keyed by DISTINCT
timestep value. Checked under every sampler by watching which step entry each network call reads: DDIM (uniform),
PLMS (its first step calls the network twice), and the pixel family's quad-100 sampler with its repeated values;
plus the fine-tuning trajectory, which skips the identity steps and reproduces generalized_steps."""
import copy

import pytest
import torch

from ddim.config import model_config
from ddim.functions.denoising import step_pairs
from ddim.pipeline import PixelDiffusion
from ddim.runners.diffusion import timestep_sequence
from ldm.pipelines import PixelFamily, adapter_for, distinct
from ldm.util import instantiate_from_config
from quant.api import make_config, quantize_
from quant.stages.calibrate import calibrate
from quant.step import StepTable, current_step

TINY_PIXEL = dict(type="simple", in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                  attn_resolutions=[16], dropout=0.0, var_type="fixedlarge", ema_rate=0.9999, ema=True,
                  resamp_with_conv=True)
QUAD100 = timestep_sequence("quad", 100, 1000)


def pixel_model():
    cfg = model_config(TINY_PIXEL, 32)
    cfg.diffusion.beta_schedule, cfg.diffusion.beta_start, cfg.diffusion.beta_end = "linear", 1e-4, 0.02
    torch.manual_seed(0)
    return PixelDiffusion(cfg).eval()


def quantized(unet, timesteps, x, t, context=None):
    """W8A8 EfficientDM structure (per-step activation quantizers), calibrated on one batch."""
    qunet = quantize_(unet, make_config("efficientdm", w_bits=8, a_bits=8, lora_rank=0), timesteps)
    calibrate(qunet, x, t, context)
    return qunet.eval()


def probe(qunet):
    """Records (timestep value, step entry k) of every network call; the hook sits inside QuantUNet's scope."""
    calls = []

    def hook(_module, args, _kwargs):
        calls.append((int(torch.as_tensor(args[1]).reshape(-1)[0].round()), current_step()))
    return calls, qunet.unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_step_table_keeps_one_entry_per_distinct_value():
    assert len(QUAD100) == 100 and QUAD100.count(0) == 4 and QUAD100.count(2) == 2
    table = StepTable(QUAD100)
    assert len(table) == 96 and table.repeats == 4 and table.timesteps == distinct(QUAD100)
    assert table.timesteps[:4] == [0, 1, 2, 3] and table.timesteps[-1] == 800
    assert table.lookup(torch.zeros(3)) == 0 and table.lookup(torch.full((2,), 2.0)) == 2
    assert table.lookup(800) == 95
    assert StepTable([1, 51, 101]).timesteps == [1, 51, 101]  # no repeats: unchanged


def test_pixel_quad_sampler_reads_the_entry_of_each_value():
    model = pixel_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    qunet = quantized(model.model.diffusion_model, QUAD100, x, torch.tensor([0, 2, 400, 800]))
    assert qunet.per_step and len(qunet.table) == 96
    model.model.diffusion_model = qunet
    calls, handle = probe(qunet)
    steps = []
    try:
        x_T = torch.randn(1, 3, 32, 32, generator=g)
        model.sample(x_T, 100, "quad", eta=0.0, generator=torch.Generator().manual_seed(1), callback=steps.append)
    finally:
        handle.remove()
    assert [t for t, _ in calls] == [t for t, _ in step_pairs(QUAD100)]  # 100 calls, sampling order
    assert all(qunet.table.timesteps[k] == t for t, k in calls)            # each reads its value's entry
    assert sorted({k for _, k in calls}) == list(range(96))
    assert {k for t, k in calls if t == 0} == {0} and [k for t, k in calls].count(0) == 4
    # the identity steps' outputs never reach the sample: x_next == x_t up to float rounding
    for s in steps:
        if s["t"] == s["t_next"]:
            assert float((s["x_next"] - s["x"]).abs().max()) <= 1e-6 * max(1.0, float(s["x"].abs().max()))


@pytest.fixture(scope="module")
def tiny_ldm():
    from test_finetune import tiny_ldm_config  # cin256-v2 in miniature (tests/quant)

    torch.manual_seed(0)
    return instantiate_from_config(tiny_ldm_config()).eval()


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_ldm_samplers_read_the_entry_of_each_value(tiny_ldm, sampler):
    fam = adapter_for(tiny_ldm)
    timesteps = fam.schedule(5)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])
    context = fam.cond(labels.numpy())
    unet = tiny_ldm.model.diffusion_model
    qunet = quantized(copy.deepcopy(unet), timesteps, torch.randn(4, 3, 8, 8, generator=g),
                      torch.tensor(timesteps[:4]), context)
    tiny_ldm.model.diffusion_model = qunet
    calls, handle = probe(qunet)
    try:
        x_T = torch.randn(2, 3, 8, 8, generator=g)
        fam.sample(x_T, fam.cond([1, 2]), fam.uncond(2), 3.0, 5, 0.0, sampler)
    finally:
        handle.remove()
        tiny_ldm.model.diffusion_model = unet
    descending = timesteps[::-1]
    if sampler == "plms":  # the first step evaluates at t and at t_next (look-ahead), then each step once
        assert [t for t, _ in calls] == descending[:2] + descending[1:]
        assert calls[1] == calls[2]  # the look-ahead call and the next step's call share the entry of t_next
    else:
        assert [t for t, _ in calls] == descending
    assert all(qunet.table.timesteps[k] == t for t, k in calls)


def test_pixel_trajectory_skips_identity_steps_and_matches_generalized_steps():
    model = pixel_model()
    traj = PixelFamily(model).trajectory(100, 0.0, "quad")
    assert len(traj) == 96 and traj.timesteps == distinct(QUAD100)
    assert [t for _, t in traj.order] == sorted(distinct(QUAD100), reverse=True)  # each value trained once
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = x_T.clone()
        for k, t in traj.order:
            x = traj.step(x, model.apply_model(x, torch.full((2,), float(t))), k)
        reference = model.sample(x_T, 100, "quad", eta=0.0)
    assert float((x - reference).abs().max()) <= 1e-4 * max(1.0, float(reference.abs().max()))


def test_finetune_epoch_trains_each_distinct_value_once():
    """One fine-tuning epoch on quad-30 (30 values, 0 repeated): one optimizer step per distinct value."""
    from quant.stages.finetune import FinetuneConfig, finetune
    from quant.stages.optim import param_groups

    seq = timestep_sequence("quad", 30, 1000)
    assert len(distinct(seq)) < len(seq)
    model = pixel_model()
    g = torch.Generator().manual_seed(0)
    teacher = model.model.diffusion_model
    student = quantize_(copy.deepcopy(teacher), make_config("efficientdm", w_bits=8, a_bits=8, lora_rank=2), seq)
    calibrate(student, torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 500]))
    calls, handle = probe(student)
    cfg = FinetuneConfig(epochs=1, batch_size=1, ddim_steps=30, guidance_scale=1.0, num_classes=None,
                         skip_type="quad", trd_mode="off", checkpoint_every=0, progress=False)
    try:
        history = finetune(model, student, param_groups(student), cfg, log=lambda *_: None)
    finally:
        handle.remove()
    trained = [t for t, _ in calls]
    assert trained == sorted(distinct(seq), reverse=True) and len(history) == 1
    assert all(student.table.timesteps[k] == t for t, k in calls)
