"""The shipped digits LDM: it loads with the standard safe loader, is the architecture its config says, its
first stage is well scaled (scale_factor 1.0), and short sampling runs give the right digits."""
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.presets import PRESETS, get_preset, load_preset_model
from ldm.util import UserError, instantiate_from_config, load_checkpoint

PRESET = get_preset("digits")
needs_ckpt = pytest.mark.skipif(not os.path.isfile(PRESET.ckpt_path), reason="digits checkpoint not trained yet")




@pytest.fixture(scope="module")
def model():
    return load_preset_model("digits", "cpu")


@needs_ckpt
def test_checkpoint_container_is_plain_and_matches_the_config():
    # loads with weights_only=True (plain types only), CompVis container fields present
    container = torch.load(PRESET.ckpt_path, map_location="cpu", weights_only=True)
    assert set(container) >= {"state_dict", "global_step", "epoch"}
    assert container["global_step"] > 0
    fresh = instantiate_from_config(OmegaConf.load(PRESET.config_path).model)
    expected = fresh.state_dict()
    sd = container["state_dict"]
    assert list(sd) == list(expected)  # same keys in the same (checkpoint) order
    assert all(sd[k].shape == expected[k].shape and sd[k].dtype == expected[k].dtype for k in sd)
    # schedule buffers are the linear 0.0015-0.0195 schedule of cin256-v2 (closed form)
    betas = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=np.float64) ** 2
    assert torch.allclose(sd["betas"], torch.tensor(betas, dtype=torch.float32))
    assert torch.allclose(sd["alphas_cumprod"], torch.tensor(np.cumprod(1 - betas), dtype=torch.float32))
    assert os.path.getsize(PRESET.ckpt_path) < 8.5 * 2 ** 20
    assert load_checkpoint(PRESET.ckpt_path)["global_step"] == container["global_step"]


@needs_ckpt
def test_loads_with_the_standard_loader(model):
    assert type(model).__name__ == "LatentDiffusion" and not model.training
    assert model.scale_factor == 1.0 and model.num_timesteps == 1000
    assert model.cond_stage_model.embedding.num_embeddings == 11  # 10 digits + null class 10
    unet = model.model.diffusion_model
    assert type(unet).__name__ == "UNetModel"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params * 4 < 8.5 * 2 ** 20


@needs_ckpt
def test_first_stage_latents_are_unit_scale_and_reconstruct(model):
    from ldm.data.digits import load_digits_split

    x, _ = load_digits_split("heldout")
    x = x[:120]
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(x))
        rec = model.decode_first_stage(z)
    assert z.shape == (120, 3, 8, 8)
    assert 0.7 < float(z.std()) < 1.4 and float(z.mean().abs()) < 0.3
    assert float((rec - x).abs().mean()) < 0.1  # inputs span [-1, 1]


@needs_ckpt
def test_short_sampling_run_gives_the_requested_digits(model, tmp_path):
    from evaluation.digits_cnn import DEFAULT_DIGITS_CNN_PATH, DigitsExtractor
    from ldm.generate import generate_samples

    if not os.path.isfile(DEFAULT_DIGITS_CNN_PATH):
        pytest.skip("digits CNN weights not available")
    out = generate_samples(model, str(tmp_path / "s.npz"), n_samples=20, batch_size=20, ddim_steps=20, eta=0.0,
                           scale=3.0, seed=0, progress=False)
    with np.load(out) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    accuracy = float((DigitsExtractor()(images)["logits"].argmax(1) == labels).mean())
    assert accuracy >= 0.9


def test_presets_point_at_configs_and_carry_the_paper_defaults():
    for preset in PRESETS.values():
        assert os.path.isfile(preset.config_path), preset.config
    digits, cin = PRESETS["digits"], PRESETS["cin256-v2"]
    assert (digits.ddim_steps, digits.eta, digits.scale, digits.samples_per_class) == (20, 0.0, 3.0, 100)
    assert (cin.ddim_steps, cin.eta, cin.scale, cin.samples_per_class, cin.null_class) == (20, 0.0, 3.0, 50, 1000)
    assert PRESETS["lsun_beds256"].use_ema and not PRESETS["lsun_beds256"].class_conditional
    with pytest.raises(UserError, match="unknown preset"):
        get_preset("cin512")


def test_missing_official_checkpoint_names_the_download_command():
    preset = PRESETS["cin256-v2"]
    if os.path.isfile(preset.ckpt_path):
        pytest.skip("the official checkpoint is present")
    with pytest.raises(UserError) as err:
        load_preset_model("cin256-v2")
    assert preset.ckpt_path in str(err.value) and "bash scripts/download_models.sh cin256-v2" in str(err.value)
