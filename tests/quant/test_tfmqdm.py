"""TFMQ-DM's own pieces (PEERS.md §3): config + presets, the Temporal Information Block found from the structure
(cin256-v2 on the meta device, the digits UNet, the DDIM model), TIAR (lower embedding error on held-out timesteps;
the ResBlocks leave the TIB linears alone afterwards), FSC (per-step sets: where each variant puts them, their
min-max values, and their selection by timestep under DDIM and PLMS)."""
import copy
import os

import pytest
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import UserError
from quant import make_config, quantize_
from quant.activation import ActQuantizer, SoftmaxQuantizer, TemporalActQuantizer, TemporalSoftmaxQuantizer
from quant.methods.tfmqdm import PRESETS, preset_options
from quant.quantizer import fake_quant
from quant.reconstruct import run_ptq
from quant.reconstruct.tib import TemporalInformationBlock, tib_layers
from quant.step import current_step

from ptq_fixtures import TIMESTEPS, fake_calib, small_unet

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# fast settings: `max` inits, a few iterations per unit, FSC on 4 trajectories per step
FAST = dict(weight_init="max", act_scale_method="max", cali_st=4, cali_n=4, fsc_n=4, weight_iters=2, tiar_iters=2,
            weight_batch=8, tiar_batch=8, act_init_n=8, running_batch=8, micro_batch=8)


def _ptq(unet, tmp_path, calib=None, timesteps=TIMESTEPS, **options):
    config = make_config("tfmqdm", **{"w_bits": 4, "a_bits": 8, **FAST, **options})
    return run_ptq(unet, config, calib or fake_calib(), tmp_path, timesteps, model_id="test")


def _resblocks(unet):
    return [(n, m) for n, m in unet.named_modules() if type(m).__name__ == "ResBlock"]


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("options, fragment", [
    ({"fsc": "kl"}, "fsc must be one of"), ({"tiar": "on"}, "tiar must be a boolean"),
    ({"fsc": "released", "softmax_bits": 16}, "at most 8 bits"), ({"fsc_n": 0}, "fsc_n"),
    ({"tiar_iters": -1}, "tiar_iters"), ({"tiar_batch": 0}, "tiar_batch"), ({"lora_rank": 2}, "no LoRA"),
    ({"running_momentum": 1.0}, "running_momentum"), ({"act_symmetric": True}, "no option"),
    ({"act_iters": 5}, "no option"),
])
def test_bad_options_are_user_errors(options, fragment):
    with pytest.raises(UserError, match=fragment):
        make_config("tfmqdm", **options)


def test_defaults_and_presets():
    c = make_config("tfmqdm", w_bits=4, a_bits=8)
    assert (c.fsc, c.tiar, c.tiar_iters, c.tiar_batch, c.weight_iters, c.weight_batch) == ("paper", True, 20000, 32,
                                                                                          20000, 32)
    assert (c.weight_lr, c.round_lambda, c.round_warmup, c.beta_start, c.beta_end) == (1e-3, 0.01, 0.2, 20.0, 2.0)
    assert (c.act_init_n, c.running_batch, c.running_momentum, c.softmax_bits) == (16, 16, 0.95, 8)
    assert c.quantize_attention_matmuls and c.lora_rank == 0 and c.act_scale_method == "mse"
    from ldm.presets import PRESETS as MODEL_PRESETS
    assert set(PRESETS) == set(MODEL_PRESETS)
    for preset in PRESETS:      # every preset's options build a valid config; FSC's 16-row init and EMA batches
        cfg = make_config("tfmqdm", **preset_options(preset))
        assert (cfg.act_init_n, cfg.running_batch) == (16, 16)
    # interval_length: bedrooms 200/10, churches 400/25, CIFAR-10 100/5; ImageNet and SD every step
    assert [PRESETS[p]["cali_st"] for p in ("lsun_beds256", "lsun_churches256", "cifar10", "cin256-v2", "sd-v1-4")] \
        == [20, 16, 20, 20, 50]
    assert PRESETS["sd-v1-4"]["weight_batch"] == 8 and PRESETS["digits"]["tiar_iters"] == 300
    with pytest.raises(UserError, match="no preset"):
        preset_options("sd")


# ----------------------------------------------------------------------------------------------------- TIB
def _meta_unet(config_name):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    config = OmegaConf.load(os.path.join(REPO, "configs", "latent-diffusion", f"{config_name}.yaml"))
    with torch.device("meta"):
        return instantiate_from_config(config.model.params.unet_config), config.model.params.unet_config.params


@pytest.mark.parametrize("config_name", ["cin256-v2", "digits-ldm-vq-4"])
def test_tib_is_the_time_mlp_plus_every_resblock_embedding_linear(config_name):
    unet, p = _meta_unet(config_name)
    # ResBlocks from the config alone: encoder num_res_blocks per level, 2 in the middle, decoder one more per level
    levels = len(p.channel_mult)
    n_blocks = levels * p.num_res_blocks + 2 + levels * (p.num_res_blocks + 1)
    names = tib_layers(unet)
    assert len(names) == 2 + n_blocks == len(set(names))
    assert names[:2] == ["time_embed.0", "time_embed.2"]
    assert set(names[2:]) == {f"{n}.emb_layers.1" for n, _ in _resblocks(unet)}
    modules = dict(unet.named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in names)
    others = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in names]
    assert others and all("transformer" in n or "proj" in n for n in others)  # the rest: attention linears


def test_tib_excludes_the_label_embedding_and_matches_the_blocks():
    """A class-conditional UNet adds label_emb(y) to h(t): the TIB is g_i(h(t)), with no part of the label path; on
    a cross-attention UNet it is exactly what every ResBlock's embedding layer computes in a real forward."""
    from ptq_fixtures import SMALL_UNET
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    labelled = UNetModel(**{**SMALL_UNET, "num_classes": 3})
    names = tib_layers(labelled)
    assert not any("label_emb" in n for n in names)
    assert not any(p is labelled.label_emb.weight for p in TemporalInformationBlock(labelled).parameters())

    unet = small_unet()
    seen = {}
    hooks = [m.emb_layers.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out))
             for n, m in _resblocks(unet)]
    t = torch.tensor([3, 3, 640, 640])
    unet(torch.randn(4, 3, 4, 4), t, context=torch.randn(4, 1, 16))
    for h in hooks:
        h.remove()
    outs = TemporalInformationBlock(unet)(t)
    assert len(outs) == len(seen) == 8
    for out, (name, _) in zip(outs, _resblocks(unet)):
        assert torch.allclose(out, seen[name])


def test_tib_of_the_ddim_model():
    from ddim.config import model_config
    from ddim.models.diffusion import Model
    cfg = dict(type="simple", in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16],
               dropout=0.0, var_type="fixedlarge", ema_rate=0.9999, ema=True, resamp_with_conv=True)
    with torch.device("meta"):
        model = Model(model_config(cfg, 32))
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ResnetBlock"]
    assert len(blocks) == 2 * 1 + 2 + 2 * 2
    assert tib_layers(model) == ["temb.dense.0", "temb.dense.1"] + [f"{n}.temb_proj" for n in blocks]


def test_layer_policy():
    q = quantize_(small_unet(), make_config("tfmqdm"), TIMESTEPS)
    layers = dict(q.quant_layers())
    fp = {"time_embed.0", "input_blocks.0.0", "out.2"}
    assert not fp & set(layers) and not any(n.endswith(("skip_connection", "op")) for n in layers)
    assert layers["time_embed.2"].act_quantizer is None                  # input not quantized, weight quantized
    assert layers["input_blocks.1.0.in_layers.2"].act_quantizer is None  # the first ResBlock conv's input
    assert all(layer.spec.rounding == "adaround" and not layer.split for layer in layers.values())
    assert q.quant_matmuls()                                              # attention matmuls quantized


# ---------------------------------------------------------------------------------------------------- TIAR
def _tib_error(fp, q, t):
    """Σ_i mean_batch Σ_dim1 (g_i(h(t)) - ĝ_i(ĥ(t)))², written out over the two UNets' own modules."""
    def embeddings(unet):
        h = unet.time_embed(timestep_embedding(t, unet.model_channels))
        return [m.emb_layers(h) for _, m in _resblocks(unet)]
    with torch.no_grad():
        return sum(float((a - b).pow(2).sum(1).mean()) for a, b in zip(embeddings(fp), embeddings(q)))


def test_tiar_lowers_the_embedding_error_on_held_out_timesteps(tmp_path):
    calib = fake_calib(steps=20, batch=2)            # timesteps 10, 20, ..., 200
    unet = small_unet()
    opts = dict(w_bits=3, cali_st=20, cali_n=2, fsc="off", fsc_n=2, weight_iters=0, tiar_iters=300, tiar_batch=32)
    nearest = _ptq(unet, tmp_path / "off", calib, tiar=False, **opts)
    tiar = _ptq(unet, tmp_path / "on", calib, tiar=True, **opts)
    held_out = torch.arange(15, 200, 20)             # 15, 35, ..., 195: none of them calibrated
    assert not set(held_out.tolist()) & set(calib["t"].tolist())
    err_nearest, err_tiar = _tib_error(unet, nearest.unet, held_out), _tib_error(unet, tiar.unet, held_out)
    assert err_tiar < 0.8 * err_nearest, (err_tiar, err_nearest)


def test_blocks_leave_the_tib_linears_out_after_tiar(tmp_path):
    unet = small_unet()
    runs = {name: _ptq(unet, tmp_path / name, **opts) for name, opts in
            {"tiar": {}, "tiar_no_blocks": {"weight_iters": 0}, "no_tiar": {"tiar": False}}.items()}
    log = runs["tiar"].ptq_log
    assert list(log["tiar"]) == ["temporal_information_block"] and "time_embed.2" not in log["weight"]
    assert "time_embed.2" in runs["no_tiar"].ptq_log["weight"]          # without TIAR it is a lone layer unit
    for name, block in _resblocks(unet):
        convs = block.in_layers[2].weight.numel() + block.out_layers[3].weight.numel()
        assert log["weight"][name]["trainables"] == convs
        assert runs["no_tiar"].ptq_log["weight"][name]["trainables"] == convs + block.emb_layers[1].weight.numel()
    # the block stage never touches what TIAR rounded, and does change the blocks' own convs
    a, b = dict(runs["tiar"].quant_layers()), dict(runs["tiar_no_blocks"].quant_layers())
    for name in tib_layers(unet)[1:]:
        assert torch.equal(a[name].weight, b[name].weight)
    assert any(not torch.equal(a[f"{n}.in_layers.2"].weight, b[f"{n}.in_layers.2"].weight) for n, _ in _resblocks(unet))


# ----------------------------------------------------------------------------------------------------- FSC
def _act_quantizers(qunet):
    return {f"{n}.{i}": q for n, m in qunet.quant_layers() + qunet.quant_matmuls()
            for i, q in enumerate(m.act_quantizers())}


def test_where_each_variant_puts_the_per_step_sets(tmp_path):
    unet = small_unet()
    tib = {f"{n}.0" for n in tib_layers(unet)}       # act quantizer 0 of each TIB linear (time_embed.2 has none)
    paper = _act_quantizers(quantize_(copy.deepcopy(unet), make_config("tfmqdm", fsc="paper"), TIMESTEPS))
    temporal = {n for n, q in paper.items() if isinstance(q, TemporalActQuantizer)}
    assert temporal == tib & set(paper) and len(temporal) == 8
    assert all(type(q) in (ActQuantizer, SoftmaxQuantizer) for n, q in paper.items() if n not in temporal)
    released = quantize_(copy.deepcopy(unet), make_config("tfmqdm", fsc="released"), TIMESTEPS)
    assert all(isinstance(q, TemporalActQuantizer) for q in _act_quantizers(released).values()) and released.per_step
    assert any(isinstance(q, TemporalSoftmaxQuantizer) for q in _act_quantizers(released).values())
    off = quantize_(copy.deepcopy(unet), make_config("tfmqdm", fsc="off"), TIMESTEPS)
    assert not any(isinstance(q, TemporalActQuantizer) for q in _act_quantizers(off).values()) and not off.per_step


def test_paper_sets_are_min_max_per_step_and_one_set_elsewhere(tmp_path):
    """Every row of step k feeds a TIB quantizer the same SiLU(ĥ(t_k)), so its EMA range is that tensor's
    [min, max]: entry k = ((max - min)/255, round(-min/Δ)). The quantizers outside the TIB keep one set."""
    qunet = _ptq(small_unet(), tmp_path, fsc="paper")
    for name, block in _resblocks(qunet.unet):
        q = block.emb_layers[1].act_quantizer
        assert isinstance(q, TemporalActQuantizer) and not bool(q.shared)
        for k, t in enumerate(qunet.table.timesteps):
            with torch.no_grad():
                u = torch.nn.functional.silu(qunet.unet.time_embed(timestep_embedding(torch.tensor([t]), 32)))
            lo, hi = float(u.min()), float(u.max())
            delta = (hi - lo) / 255
            assert q.delta[k].item() == pytest.approx(delta, rel=1e-4)
            assert q.zero[k].item() == round(-lo / delta)
        assert len(set(q.delta.tolist())) == len(qunet.table)          # one distinct set per step
    assert qunet.per_step
    outside = [q for n, q in _act_quantizers(qunet).items() if ".emb_layers." not in n]
    assert outside and all(q.delta.dim() == 0 and q.delta.item() > 0 for q in outside)


def test_fsc_refuses_calibration_that_misses_a_step(tmp_path):
    with pytest.raises(UserError, match="no rows at timestep 999"):
        _ptq(small_unet(), tmp_path, timesteps=TIMESTEPS + [999])


@pytest.fixture(scope="module")
def tiny_ldm():
    from ldm.util import instantiate_from_config
    from test_finetune import tiny_ldm_config  # cin256-v2 in miniature (tests/quant)

    from refdata import deterministic_init_

    torch.manual_seed(0)
    model = instantiate_from_config(tiny_ldm_config()).eval().requires_grad_(False)
    deterministic_init_(model.model, 1)    # a non-zero output, so PLMS's look-ahead input differs from the step's
    return model


def _calib_on(timesteps, context, seed=0):
    """A calib.pt-shaped artifact with one entry per timestep (sampling order), rows [uncond; cond] of 2 samples."""
    g = torch.Generator().manual_seed(seed)
    rows = len(timesteps) * 4
    t = torch.tensor(sorted(timesteps, reverse=True)).repeat_interleave(4)
    return {"meta": {"n_entries": len(timesteps), "rows_per_entry": 4, "calib_steps": len(timesteps),
                     "calib_batch": 2, "calib_batches": 1},
            "x": torch.randn(rows, 3, 8, 8, generator=g), "t": t, "context": context.repeat(len(timesteps), 1, 1)}


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_per_step_sets_are_selected_by_timestep(tiny_ldm, tmp_path, sampler):
    from ldm.pipelines import adapter_for
    fam = adapter_for(tiny_ldm)
    timesteps = fam.schedule(5)
    context = torch.cat([fam.uncond(2), fam.cond([1, 2])])
    unet = tiny_ldm.model.diffusion_model
    qunet = _ptq(copy.deepcopy(unet), tmp_path, _calib_on(timesteps, context), timesteps, fsc="released",
                 cali_st=5, cali_n=2, fsc_n=2, act_init_n=4, running_batch=4).eval()
    tib_q = dict(qunet.quant_layers())["input_blocks.1.0.emb_layers.1"].act_quantizer
    assert len(set(tib_q.delta.tolist())) == 5                       # the sets differ, so selection matters
    calls, applied = [], []

    def probe(_module, args, _kwargs):
        calls.append((int(torch.as_tensor(args[1]).reshape(-1)[0]), current_step()))

    def check(mod, args, out):
        applied.append((calls[-1][0], torch.equal(out, fake_quant(args[0], mod.delta[current_step()],
                                                                   mod.zero[current_step()], 256))))
    handles = [qunet.unet.register_forward_pre_hook(probe, with_kwargs=True), tib_q.register_forward_hook(check)]
    tiny_ldm.model.diffusion_model = qunet
    try:
        fam.sample(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), fam.cond([1, 2]),
                   fam.uncond(2), 3.0, 5, 0.0, sampler)
    finally:
        for h in handles:
            h.remove()
        tiny_ldm.model.diffusion_model = unet
    descending = timesteps[::-1]
    if sampler == "plms":     # the first step evaluates at t and at t_next (look-ahead), then each step once
        assert [t for t, _ in calls] == descending[:2] + descending[1:]
        assert calls[1] == calls[2]
    else:
        assert [t for t, _ in calls] == descending
    assert all(timesteps.index(t) == k for t, k in calls)           # each call reads its timestep's entry
    assert len(applied) == len(calls) and all(ok for _, ok in applied)
    # a model calibrated on this schedule refuses a timestep outside it, in one sentence
    with pytest.raises(UserError, match="not in the quantized model's schedule"):
        qunet(torch.randn(4, 3, 8, 8), torch.full((4,), 500), context=context)


# --------------------------------------------------------------------------------------------- calibration data
@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_fresh_per_step_runs_stop_after_their_step(tiny_ldm, sampler):
    """With the same x_T for every run, deterministic sampling (eta 0) makes run k's kept input the trajectory's
    step-k input: the fresh entries equal one recorded trajectory's, at n(n+1)/2 (+ PLMS look-aheads) UNet calls."""
    from ldm.pipelines import adapter_for
    from quant.calib_fresh import record_fresh_per_step, unet_calls
    fam = adapter_for(tiny_ldm)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    cond, uncond = fam.cond([4, 7]), fam.uncond(2)
    reference = fam.record(x_T, cond, uncond, 3.0, 4, 0.0, sampler)
    calls = []
    handle = tiny_ldm.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        fresh = record_fresh_per_step(fam, lambda k: (x_T, cond, uncond, None), 3.0, 4, 0.0, sampler)
    finally:
        handle.remove()
    assert len(fresh) == len(reference) == 4
    for a, b in zip(fresh, reference):
        assert torch.equal(a["t"], b["t"]) and torch.allclose(a["x"], b["x"], atol=1e-6)
        assert torch.equal(a["context"], b["context"])
    # runs end at their step: 1 + 2 + 3 + 4 calls (PLMS: + a look-ahead in each run past step 0); the call that
    # stops a run is refused before it reaches the UNet's other hooks
    assert len(calls) == unet_calls(4, sampler) == (10 if sampler == "ddim" else 13)


def test_killed_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    """Killed after TIAR and two blocks, the re-run solves only the rest and gives the unbroken run's state."""
    import quant.reconstruct.driver as driver
    unet = small_unet()
    ref = _ptq(unet, tmp_path / "ref")
    solves = len(ref.ptq_log["tiar"]) + len(ref.ptq_log["weight"])
    ref = ref.state_dict()
    real, calls = driver.solve, []

    def dies_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(driver, "solve", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        _ptq(unet, tmp_path / "run")
    resumed = []
    monkeypatch.setattr(driver, "solve", lambda *a, **k: resumed.append(1) or real(*a, **k))
    got = _ptq(unet, tmp_path / "run")
    assert len(resumed) == solves - 3 and solves > 6             # TIAR + units, less the three finished
    got = got.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
