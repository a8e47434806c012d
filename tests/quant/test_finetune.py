"""Stage-3 loop (MPQ-DM.md §9) on a tiny randomly initialised LDM: loss goes down, resume is exact, TRD gradient
semantics on real LoRA parameters, NaN guard, gradient checkpointing equivalence, previews, artifacts."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.training import deterministic_init_
from ldm.util import UserError, instantiate_from_config
from quant.api import make_config, quantize_
from quant.artifacts import check_meta, config_hash, load_artifact, save_artifact
from quant.stages.calibrate import calibrate
from quant.stages.finetune import (FinetuneConfig, FinetuneDiverged, guided_eps, finetune, trajectory_loss)
from quant.stages.optim import param_groups
from quant.methods.trd import TRD

STEPS = 4


def tiny_ldm_config():
    """cin256-v2 in miniature: crossattn class conditioning (10 classes + null 10), VQ-f2 first stage."""
    return OmegaConf.create({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "first_stage_key": "image",
        "cond_stage_key": "class_label", "image_size": 8, "channels": 3, "cond_stage_trainable": True,
        "conditioning_key": "crossattn", "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
            "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 1,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 16, "ddconfig": {
                "double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": 11, "embed_dim": 32, "key": "class_label"}}}})


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_ldm_config()).eval().requires_grad_(False)
    deterministic_init_(model.model, 1)
    return model


@pytest.fixture(scope="module")
def naive_state(fp_model):
    """(meta, state_dict) of a calibrated W2A4 MPQ-DM student: the naive artifact, in memory."""
    qunet = _quantize(fp_model, "mpqdm")
    return qunet.meta(), copy.deepcopy(qunet.state_dict())


def _quantize(model, method, **opts):
    timesteps = [int(t) for t in make_ddim_timesteps("uniform", STEPS, model.num_timesteps, verbose=False)]
    opts = {"w_bits": 2, "a_bits": 4, "lora_rank": 4, **opts}
    qunet = quantize_(copy.deepcopy(model.model.diffusion_model), make_config(method, **opts), timesteps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=gen)
    t = torch.tensor(timesteps).repeat(4)
    c = model.get_learned_conditioning({"class_label": torch.randint(0, 11, (16,), generator=gen)})
    calibrate(qunet, x, t, c)
    return qunet


def _student(fp_model, naive_state, **opts):
    from quant.api import build_from_meta
    meta, state = naive_state
    qunet = build_from_meta(copy.deepcopy(fp_model.model.diffusion_model), meta)
    qunet.load_state_dict(state)
    return qunet


def _cfg(**kw):
    base = dict(epochs=3, batch_size=2, ddim_steps=STEPS, guidance_scale=3.0, num_classes=10, null_class=10,
                trd_mode="paper", checkpoint_every=1, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def _trainable(qunet):
    return {n: p.detach().clone() for n, p in qunet.named_parameters() if p.requires_grad}


def test_loss_decreases_against_fp_teacher(fp_model, naive_state):
    student = _student(fp_model, naive_state)
    groups = param_groups(student)
    cfg = _cfg(epochs=4, trd_mode="off", seed=11)
    before = trajectory_loss(fp_model, student, cfg, epoch=0)
    history = finetune(fp_model, student, groups, cfg, log=lambda *_: None)
    after = trajectory_loss(fp_model, student, cfg, epoch=0)
    assert len(history) == 4 and all(h["skipped"] == 0 for h in history)
    assert after < 0.97 * before, (before, after)
    assert history[-1]["lr_factor"] == 0.0 and history[0]["lr_factor"] == pytest.approx(0.75)  # linear decay reaches 0 at the last iteration


def test_resume_gives_the_same_final_state(fp_model, naive_state, tmp_path):
    cfg = _cfg(epochs=3)
    straight = _student(fp_model, naive_state)
    finetune(fp_model, straight, param_groups(straight), cfg, ckpt_path=str(tmp_path / "a.pt"),
             log=lambda *_: None)

    first = _student(fp_model, naive_state)
    hist1 = finetune(fp_model, first, param_groups(first), cfg, ckpt_path=str(tmp_path / "b.pt"), until_epoch=1,
                     log=lambda *_: None)
    assert len(hist1) == 1
    resumed = _student(fp_model, naive_state)  # a fresh process would rebuild the student from naive.pt
    msgs = []
    hist = finetune(fp_model, resumed, param_groups(resumed), cfg, ckpt_path=str(tmp_path / "b.pt"), log=msgs.append)
    assert any("resuming" in m for m in msgs) and len(hist) == 3
    want, got = _trainable(straight), _trainable(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], rtol=1e-6, atol=1e-9), name

    with pytest.raises(UserError, match="epochs"):  # other arguments: refused, not silently mixed
        other = _student(fp_model, naive_state)
        finetune(fp_model, other, param_groups(other), _cfg(epochs=5), ckpt_path=str(tmp_path / "b.pt"))


def _trd_lora_grads(fp_model, naive_state, mode):
    student = _student(fp_model, naive_state)
    groups = param_groups(student)
    lora = [p for g in groups if str(g.get("name", "")).startswith("lora:") for p in g["params"]]
    teacher = fp_model.model.diffusion_model
    trd = TRD(teacher, student, mode=mode, window=2)
    cfg = _cfg()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    labels = torch.tensor([1, 7])
    c = fp_model.get_learned_conditioning({"class_label": labels})
    uc = fp_model.get_learned_conditioning({"class_label": torch.full_like(labels, 10)})
    trd.reset()
    for p, t in enumerate([751, 501]):
        with trd.capture():
            with torch.no_grad():
                guided_eps(fp_model, teacher, x, t, c, uc, cfg.guidance_scale)
            guided_eps(fp_model, student, x, t, c, uc, cfg.guidance_scale)
        loss = trd.step_loss(p)
    trd.remove()
    if not loss.requires_grad:
        return loss, [torch.zeros_like(p) for p in lora]
    grads = torch.autograd.grad(loss, lora, allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for p, g in zip(lora, grads)]


def test_trd_gradient_reaches_lora_in_paper_mode_only(fp_model, naive_state):
    loss_p, grads_p = _trd_lora_grads(fp_model, naive_state, "paper")
    loss_r, grads_r = _trd_lora_grads(fp_model, naive_state, "released")
    assert loss_p.item() > 0 and torch.allclose(loss_p.detach(), loss_r)
    assert sum(g.abs().sum().item() for g in grads_p) > 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_r)


def test_released_trd_trains_exactly_like_off(fp_model, naive_state):
    runs = {}
    for mode in ("released", "off"):
        student = _student(fp_model, naive_state)
        hist = finetune(fp_model, student, param_groups(student), _cfg(epochs=1, trd_mode=mode), log=lambda *_: None)
        runs[mode] = (_trainable(student), hist)
    assert runs["released"][1][0]["trd"] > 0 and runs["off"][1][0]["trd"] == 0
    for name, value in runs["off"][0].items():
        assert torch.equal(value, runs["released"][0][name]), name


def test_gradient_checkpointing_matches(fp_model, naive_state):
    states = []
    for flag in (False, True):
        student = _student(fp_model, naive_state)
        finetune(fp_model, student, param_groups(student), _cfg(epochs=1, grad_checkpoint=flag), log=lambda *_: None)
        states.append(_trainable(student))
    for name in states[0]:
        assert torch.allclose(states[0][name], states[1][name], rtol=1e-5, atol=1e-8), name


def test_nan_guard_skips_then_aborts(fp_model, naive_state):
    student = _student(fp_model, naive_state)
    groups = param_groups(student)
    _, layer = student.quant_layers()[5]
    with torch.no_grad():
        layer.act_quantizer.delta.fill_(float("nan"))
    before = _trainable(student)
    msgs = []
    with pytest.raises(FinetuneDiverged, match="3 consecutive") as err:
        finetune(fp_model, student, groups, _cfg(nan_patience=3), log=msgs.append)
    assert sum("skipped" in m for m in msgs) == 3
    # epoch 0, no checkpoint: nothing to resume, and the message must not suggest it
    assert err.value.epoch == 0 and err.value.checkpoint_epoch is None and "resum" not in str(err.value)
    after = _trainable(student)
    assert all(torch.equal(before[n], after[n]) or torch.isnan(before[n]).any() for n in before)


def test_preview_png_written(fp_model, naive_state, tmp_path):
    from PIL import Image
    student = _student(fp_model, naive_state)
    finetune(fp_model, student, param_groups(student), _cfg(epochs=1, preview_every=1, preview_classes=(3, 8),
                                                             trd_mode="off"),
             preview_dir=str(tmp_path), log=lambda *_: None)
    files = list(tmp_path.glob("preview_epoch*.png"))
    assert len(files) == 1
    assert Image.open(files[0]).size == (32, 16)  # two 16x16 decoded samples side by side


def test_artifact_roundtrip_and_meta_check(tmp_path):
    path = tmp_path / "naive.pt"
    save_artifact(path, {"n_bits_w": 2, "timesteps": (1, 251, 501, 751), "method": "mpqdm"},
                  state_dict={"w": torch.ones(2)})
    art = load_artifact(path)
    assert art["meta"]["timesteps"] == [1, 251, 501, 751] and art["meta"]["toolkit_version"]
    assert torch.equal(art["state_dict"]["w"], torch.ones(2))
    check_meta(art["meta"], {"n_bits_w": 2, "timesteps": [1, 251, 501, 751]})
    with pytest.raises(UserError) as err:
        check_meta(art["meta"], {"method": "mpqdm", "n_bits_w": 4}, what="naive artifact")
    text = str(err.value)
    assert "n_bits_w=2" in text and "4 is expected" in text and text.count(".") == 1 and text.endswith(".")
    with pytest.raises(UserError, match="does not exist"):
        load_artifact(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="could not be read"):
        load_artifact(tmp_path / "junk.pt")
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash(OmegaConf.create({"b": [1, 2], "a": 1}))


def test_unconditional_model_trains_without_cfg():
    """LSUN-style: no class embedder, conditioning_key None, eta 1 (noise from the epoch generator)."""
    cfg_dict = OmegaConf.to_container(tiny_ldm_config())
    params = cfg_dict["params"]
    params.update(cond_stage_config="__is_unconditional__", cond_stage_key="image", cond_stage_trainable=False)
    params.pop("conditioning_key")
    params["unet_config"]["params"].update(use_spatial_transformer=False, num_head_channels=32)
    params["unet_config"]["params"].pop("context_dim")
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.create(cfg_dict)).eval().requires_grad_(False)
    deterministic_init_(model.model, 2)
    timesteps = [int(t) for t in make_ddim_timesteps("uniform", STEPS, model.num_timesteps, verbose=False)]
    student = quantize_(copy.deepcopy(model.model.diffusion_model),
                        make_config("mpqdm", w_bits=3, a_bits=6, lora_rank=4), timesteps)
    calibrate(student, torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
              torch.tensor(timesteps).repeat(2))
    cfg = _cfg(epochs=2, num_classes=None, ddim_eta=1.0, trd_mode="paper")
    hist = finetune(model, student, param_groups(student), cfg, log=lambda *_: None)
    assert len(hist) == 2 and all(h["skipped"] == 0 and h["out"] > 0 and h["trd"] > 0 for h in hist)
    # eta > 0 trajectories are still a function of the epoch alone
    assert trajectory_loss(model, student, cfg, epoch=1) == trajectory_loss(model, student, cfg, epoch=1)


def test_lora_lr_scale_scales_only_the_lora_groups(tiny_cin):
    build, _ = tiny_cin
    lrs = []
    for scale in (1.0, 0.1):
        qunet = quantize_(build(), make_config("mpqdm", w_bits=2, a_bits=4, lora_rank=4), [1, 501])
        lrs.append({g["name"]: g["lr"] for g in param_groups(qunet, lora_lr_scale=scale)})
    lora = [n for n in lrs[0] if n.startswith("lora:")]
    assert lora and all(lrs[1][n] == pytest.approx(0.1 * lrs[0][n]) for n in lora)
    assert all(lrs[1][n] == lrs[0][n] for n in lrs[0] if not n.startswith("lora:"))


def test_weight_decay_of_the_config_reaches_every_group(fp_model, naive_state, tmp_path):
    """FinetuneConfig.weight_decay is what AdamW uses (the groups of param_groups carry 0.01 by default)."""
    ckpt = tmp_path / "state.pt"
    for decay in (0.05, 0.0):
        student = _student(fp_model, naive_state)
        groups = param_groups(student)
        assert all(g["weight_decay"] == 0.01 for g in groups)
        if ckpt.exists():
            ckpt.unlink()
        finetune(fp_model, student, groups, _cfg(epochs=1, weight_decay=decay, trd_mode="off"), ckpt_path=str(ckpt),
                 log=lambda *_: None)
        state = torch.load(ckpt, weights_only=True)
        assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [decay] * len(groups)
        assert state["meta"]["weight_decay"] == decay
