"""LatentDiffusion internals: schedule buffers, training loss, EMA, frozen stages."""
import pytest
import torch
import torch.nn as nn

from ldm.models.diffusion.ddpm import DDPM
from ldm.modules.ema import LitEma
from refdata import ref_dir, require


def _schedule_only(linear_start, linear_end):
    ddpm = DDPM.__new__(DDPM)  # only the schedule part, no UNet needed
    nn.Module.__init__(ddpm)
    ddpm.v_posterior, ddpm.parameterization = 0.0, "eps"
    ddpm.register_schedule(linear_start=linear_start, linear_end=linear_end)
    return ddpm


@pytest.mark.parametrize("setting", ["linear_0.0015_0.0195", "linear_0.0015_0.0155", "linear_0.00085_0.012"])
def test_schedule_buffers_bit_exact(setting):
    ref = torch.load(require(ref_dir() / "vectors" / "schedules.pt"), weights_only=True)[setting]
    ddpm = _schedule_only(ref["linear_start"], ref["linear_end"])
    sd = ddpm.state_dict()
    assert list(sd) == list(ref["buffers_float32"])  # registration order = checkpoint order
    for k, v in ref["buffers_float32"].items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v), k
    assert torch.equal(ddpm.lvlb_weights, ref["lvlb_weights_float32_nonpersistent"])
    assert "lvlb_weights" not in sd


def _digits_preset():
    import os

    from ldm.presets import get_preset
    preset = get_preset("digits")
    if not os.path.isfile(preset.ckpt_path):
        pytest.skip(f"the shipped digits checkpoint {preset.ckpt_path} is missing (scripts/train_digits_ldm.py)")
    return preset


@pytest.fixture(scope="module")
def cin():
    """The shipped digits LDM: class-conditional (ClassEmbedder), VQ first stage, 3x8x8 latents, like the
    reference's tiny cin LDM but part of the repository."""
    from ldm.presets import load_preset_model
    _digits_preset()
    return load_preset_model("digits", "cpu")


def test_eps_training_loss_is_mean_squared_error(cin):
    model = cin
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8, generator=g)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([5, 700])
    c = model.get_learned_conditioning({"class_label": torch.tensor([1, 2])})
    loss, logs = model.p_losses(x0, c, t, noise=noise)
    with torch.no_grad():
        eps = model.apply_model(model.q_sample(x0, t, noise), t, c)
    torch.testing.assert_close(loss, ((eps - noise) ** 2).mean())
    assert torch.equal(logs["loss"], loss.detach())

    # forward draws t and noise from the generator: reproducible, and gradients reach UNet + class embedding
    model.zero_grad(set_to_none=True)
    l1, _ = model(x0, {"class_label": torch.tensor([1, 2])}, generator=torch.Generator().manual_seed(7))
    l2, _ = model(x0, {"class_label": torch.tensor([1, 2])}, generator=torch.Generator().manual_seed(7))
    assert torch.equal(l1, l2)
    l1.backward()
    assert model.cond_stage_model.embedding.weight.grad is not None
    assert model.model.diffusion_model.out[-1].weight.grad is not None
    assert all(p.grad is None for p in model.first_stage_model.parameters())
    model.zero_grad(set_to_none=True)


def test_train_keeps_first_stage_frozen_in_eval(cin):
    cin.train()
    try:
        assert cin.model.training and not cin.first_stage_model.training
        assert cin.cond_stage_model.training  # trainable ClassEmbedder follows the parent
    finally:
        cin.eval()


def test_lit_ema_update_and_scope():
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    config = OmegaConf.to_container(OmegaConf.load(_digits_preset().config_path).model)
    model = instantiate_from_config({"target": config["target"], "params": dict(config["params"], use_ema=True)})
    ema = model.model_ema
    assert ema.num_updates.dtype == torch.int32 and ema.decay.dtype == torch.float32
    name = "diffusion_model.out.2.weight"
    shadow0 = dict(ema.named_buffers())[name.replace(".", "")].clone()
    param = dict(model.model.named_parameters())[name]
    with torch.no_grad():
        param.add_(1.0)
    ema(model.model)
    decay = min(0.9999, 2 / 11)  # first update: (1 + n) / (10 + n) with n = 1
    expected = shadow0 - (1 - decay) * (shadow0 - param.detach())
    torch.testing.assert_close(dict(ema.named_buffers())[name.replace(".", "")], expected)
    assert int(ema.num_updates) == 1
    before = param.detach().clone()
    with model.ema_scope():
        torch.testing.assert_close(param.detach(), expected)
    assert torch.equal(param.detach(), before)
    assert isinstance(ema, LitEma)
