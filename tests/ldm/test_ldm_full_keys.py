"""Full-size configs built on the meta device: state-dict keys, order, shapes, dtypes and counts as the original."""
import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from ldm.util import instantiate_from_config
from refdata import load_json

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {
    "cin256-v2": "latent-diffusion/cin256-v2.yaml",
    "lsun_bedrooms-ldm-vq-4": "latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml",
    "celebahq-ldm-vq-4": "latent-diffusion/celebahq-ldm-vq-4.yaml",
    "ffhq-ldm-vq-4": "latent-diffusion/ffhq-ldm-vq-4.yaml",
    "lsun_churches-ldm-kl-8": "latent-diffusion/lsun_churches-ldm-kl-8.yaml",
    "sd-v1-inference": "stable-diffusion/v1-inference.yaml",
}


def _params(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_size_state_dict_layout(name):
    if name.startswith("sd-"):
        pytest.importorskip("transformers", reason="transformers not installed (needed for FrozenCLIPEmbedder)")
    expected = load_json(f"configs/{name}.state_dict.json")
    summary = load_json(f"configs/{name}.summary.json")
    hparams = load_json(f"configs/{name}.hparams.json")["config"]
    with open(REPO / "configs" / CONFIGS[name]) as fh:
        config = yaml.safe_load(fh)
    # our YAML = the official one minus the first-stage ckpt_path
    official = hparams["model"]
    official["params"]["first_stage_config"]["params"].pop("ckpt_path", None)
    assert config["model"] == official

    with torch.device("meta"):
        model = instantiate_from_config(config["model"])
    sd = model.state_dict()
    assert list(sd) == list(expected), "state_dict keys / order differ"
    assert {k: list(v.shape) for k, v in sd.items()} == dict(expected)
    dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in sd.items() if v.dtype != torch.float32}
    assert dtypes == dict(summary["non_float32_dtypes"])
    assert hashlib.sha256("\n".join(sd).encode()).hexdigest() == summary["keys_sha256"]

    counts = summary["parameter_counts"]
    assert _params(model.model.diffusion_model) == counts["model.diffusion_model"]
    assert _params(model.first_stage_model) == counts["first_stage_model"]
    assert _params(model.cond_stage_model) == counts.get("cond_stage_model", 0)
    assert _params(model) == summary["total_parameters"]

    param_names = {f"{n}" for n, _ in model.named_parameters()}
    assert [k for k in sd if k not in param_names] == summary["persistent_buffer_keys"]
    assert "lvlb_weights" not in sd and tuple(model.lvlb_weights.shape) == (1000,)

    attrs = summary["attributes"]
    assert model.model.conditioning_key == attrs["conditioning_key"]
    for key in ("parameterization", "cond_stage_key", "first_stage_key", "cond_stage_trainable", "num_timesteps",
                "image_size", "channels", "use_ema", "scale_by_std", "clip_denoised", "loss_type", "log_every_t"):
        assert getattr(model, key) == attrs[key], key
    assert torch.is_tensor(model.scale_factor) == attrs["scale_factor_is_buffer"]
    if not torch.is_tensor(model.scale_factor):  # a buffer here is a meta tensor without a value
        assert model.scale_factor == attrs["scale_factor"]
    assert type(model.first_stage_model).__name__ == summary["first_stage"]["cls"]
    assert list(model.first_stage_model.decoder.z_shape) == summary["first_stage"]["z_shape_decoder"]
    if "n_e" in summary["first_stage"]:
        q = model.first_stage_model.quantize
        fs = summary["first_stage"]
        assert (q.n_e, q.e_dim, q.beta, q.legacy, q.remap, q.sane_index_shape) == (
            fs["n_e"], fs["e_dim"], fs["beta"], fs["legacy"], fs["remap"], fs["sane_index_shape"])
    cond_cls = type(model.cond_stage_model).__name__ if model.cond_stage_model is not None else None
    assert cond_cls == attrs["cond_stage_model_class"]
