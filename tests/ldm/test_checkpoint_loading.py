"""Safe checkpoint loading: Lightning containers without Lightning, no pickled code run, checked keys."""
import os
from collections import OrderedDict

import pytest
import torch

from ldm.util import UserError, load_checkpoint, load_model_from_config, load_state_dict_file
from refdata import load_composed, ref_dir, require

FIXTURE = "fixture_lightning_ckpt_format.ckpt"


def test_lightning_fixture_loads_without_lightning():
    path = require(ref_dir() / "vectors" / FIXTURE)
    with pytest.raises(Exception):  # the container quirk: a class reference the safe torch loader refuses
        torch.load(path, weights_only=True)
    ckpt = load_checkpoint(path)
    assert ckpt["global_step"] == 470000
    sd = ckpt["state_dict"]
    assert sd["model_ema.decay"].dtype == torch.float32 and float(sd["model_ema.decay"]) == pytest.approx(0.9999)
    assert sd["model_ema.num_updates"].dtype == torch.int32
    _, ref = load_composed("f_ldm_sd_tiny.sampling")
    buffers = [k for k in sd if not k.startswith("model_ema.")]
    assert buffers == list(ref)[:12]
    for k in buffers:
        assert torch.equal(sd[k], ref[k]), k
    (cls, state), = ckpt["callbacks"].items()
    assert cls.__name__ == "ModelCheckpoint" and state["dirpath"] == "/fake/dir/checkpoints"
    assert list(load_state_dict_file(path)) == list(sd)


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evals:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "nested-in-list"])
def test_pickled_code_is_refused_not_run(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = {"os.system": _RunsCommand(marker), "builtins.eval": _Evals(),
            "nested-in-list": [_RunsCommand(marker)]}[payload]
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 1, "payload": evil}, path)
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_checkpoint_names_download_command(tmp_path):
    path = tmp_path / "models" / "ldm" / "cin256-v2" / "model.ckpt"
    with pytest.raises(UserError) as err:
        load_state_dict_file(path)
    assert str(path) in str(err.value)
    assert "bash scripts/download_models.sh cin256-v2" in str(err.value)
    # the folders scripts/download_models.sh writes map to its model names
    with pytest.raises(UserError, match="download_models.sh sd-v1-4`"):
        load_state_dict_file(tmp_path / "models" / "ldm" / "stable-diffusion-v1" / "model.ckpt")
    with pytest.raises(UserError, match="download_models.sh lsun_churches`"):
        load_state_dict_file(tmp_path / "models" / "ldm" / "lsun_churches256" / "model.ckpt")


@pytest.fixture(scope="module")
def tiny():
    """(config, state dict) of the shipped digits LDM: a small model of the repository's own, so these loader
    tests run without the shared reference folder."""
    from omegaconf import OmegaConf

    from ldm.presets import get_preset
    preset = get_preset("digits")
    if not os.path.isfile(preset.ckpt_path):
        pytest.skip(f"the shipped digits checkpoint {preset.ckpt_path} is missing (scripts/train_digits_ldm.py)")
    sd = load_checkpoint(preset.ckpt_path)["state_dict"]
    return OmegaConf.to_container(OmegaConf.load(preset.config_path)), OrderedDict(sd)


def _container(sd, **extra):
    return {"epoch": 3, "global_step": 1234, "state_dict": OrderedDict(sd, **extra)}


def test_whitelisted_extra_keys_load(tmp_path, tiny):
    config, sd = tiny
    path = tmp_path / "tiny.ckpt"
    torch.save(_container(sd, **{"model_ema.decay": torch.tensor(0.9999),
                                 "model_ema.num_updates": torch.tensor(5, dtype=torch.int32)}), path)
    model = load_model_from_config(config, path)
    assert model.global_step == 1234 and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_unexpected_and_missing_keys_are_listed(tmp_path, tiny):
    config, sd = tiny
    path = tmp_path / "extra.ckpt"
    torch.save(_container(sd, **{"model.something_new.weight": torch.zeros(1)}), path)
    with pytest.raises(UserError, match=r"unexpected keys: model\.something_new\.weight"):
        load_model_from_config(config, path)
    reduced = OrderedDict(sd)
    del reduced["first_stage_model.quant_conv.bias"]
    torch.save(_container(reduced), path)
    with pytest.raises(UserError, match=r"missing keys: first_stage_model\.quant_conv\.bias"):
        load_model_from_config(config, path)
    wrong = OrderedDict(sd, **{"betas": torch.zeros(10)})
    torch.save(_container(wrong), path)
    with pytest.raises(UserError, match="shapes"):
        load_model_from_config(config, path)


def test_safetensors_round_trip_and_ema_weights(tmp_path, tiny):
    from safetensors.torch import save_file
    config, sd = tiny
    shadows = {"model_ema." + k[len("model."):].replace(".", ""): v + 1.0
               for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in {**sd, **shadows}.items()}, str(path))
    loaded = load_state_dict_file(path)
    assert set(loaded) == set(sd) | set(shadows)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())

    plain = load_model_from_config(config, path)  # shadows recognised, not used
    ema = load_model_from_config(config, path, use_ema_weights=True)
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            assert torch.equal(plain.state_dict()[k], v)
            assert torch.equal(ema.state_dict()[k], v + 1.0)
    partial = dict(list(shadows.items())[:3])
    save_file({k: v.contiguous() for k, v in {**sd, **partial}.items()}, str(path))
    with pytest.raises(UserError, match="incomplete EMA"):
        load_model_from_config(config, path)


def test_first_stage_ckpt_path_tolerates_only_training_loss_keys(tmp_path):
    from ldm.models.autoencoder import AutoencoderKL
    from refdata import load_vector
    rec, sd = load_vector("c_autoencoder_kl_tiny")
    cfg = rec["config"]
    path = tmp_path / "kl.ckpt"
    torch.save(_container(sd, **{"loss.discriminator.main.0.weight": torch.zeros(1)}), path)
    ae = AutoencoderKL(ddconfig=cfg["ddconfig"], lossconfig=cfg["lossconfig"], embed_dim=4, ckpt_path=str(path))
    assert all(torch.equal(ae.state_dict()[k], v) for k, v in sd.items())
    torch.save(_container(sd, **{"encoder.extra.weight": torch.zeros(1)}), path)
    with pytest.raises(UserError, match="encoder.extra.weight"):
        AutoencoderKL(ddconfig=cfg["ddconfig"], lossconfig=cfg["lossconfig"], embed_dim=4, ckpt_path=str(path))
    with pytest.raises(UserError, match="not found"):
        AutoencoderKL(ddconfig=cfg["ddconfig"], lossconfig=cfg["lossconfig"], embed_dim=4,
                      ckpt_path=str(tmp_path / "none.ckpt"))


# ---------------------------------------------------------------------------------------------- config targets
def test_config_targets_outside_the_toolkit_need_trust(tmp_path):
    from ldm.util import instantiate_from_config

    marker = tmp_path / "pwned"
    with pytest.raises(UserError, match="--trust_config") as err:
        instantiate_from_config({"target": "os.system", "params": {"command": f"touch {marker}"}})
    assert "os.system" in str(err.value) and not marker.exists()
    nested = {"target": "torch.nn.Sequential", "params": {"foo": {"target": "subprocess.Popen"}}}
    with pytest.raises(UserError, match="subprocess.Popen"):  # checked before anything is imported or called
        instantiate_from_config(nested)
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)
    assert instantiate_from_config({"target": "collections.OrderedDict"}, trust_config=True) == OrderedDict()


def test_trust_reaches_the_sub_configs_a_model_builds(tmp_path):
    """LatentDiffusion instantiates its first stage (and that its lossconfig) itself: the opt-in given at the top
    must hold there too, and only for that call."""
    from omegaconf import OmegaConf

    from ldm.presets import get_preset
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(get_preset("digits").config_path).model
    config.params.first_stage_config.params.lossconfig.target = "collections.OrderedDict"
    with pytest.raises(UserError, match="collections.OrderedDict"):
        instantiate_from_config(config)
    model = instantiate_from_config(config, trust_config=True)
    assert isinstance(model.first_stage_model.loss, OrderedDict)
    with pytest.raises(UserError):  # the opt-in did not leak into later calls
        instantiate_from_config(config.params.first_stage_config)
