"""scripts/train_digits_pixel.py: an interrupted and resumed run gives the weights of an uninterrupted one."""
import importlib.util
import os

import pytest
import torch

from ddim.pipeline import load_pixel_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = """
data: {dataset: DIGITS, image_size: 32, channels: 3, logit_transform: false, uniform_dequantization: false,
       gaussian_dequantization: false, random_flip: false, rescaled: true, num_workers: 0}
model: {type: simple, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 2], num_res_blocks: 1,
        attn_resolutions: [16], dropout: 0.0, var_type: fixedlarge, ema_rate: 0.9, ema: true, resamp_with_conv: true}
diffusion: {beta_schedule: linear, beta_start: 0.0001, beta_end: 0.02, num_diffusion_timesteps: 1000}
"""


def _script():
    spec = importlib.util.spec_from_file_location("train_digits_pixel", os.path.join(REPO, "scripts",
                                                                                      "train_digits_pixel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_importing_the_script_leaves_the_cpu_caps_alone():
    """The AVX2 caps are set only when the script runs as a program: set in a process whose libraries are loaded,
    they reach OpenVINO's oneDNN after it chose its kernels and it crashed (segfault in the deploy tests)."""
    before = dict(os.environ)
    train = _script()
    assert set(train.CPU_ISA_PINS) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR"}
    assert dict(os.environ) == before


def _tiny_run(tmp_path, monkeypatch, n_images):
    """(the script module, the tiny config's path) with the training data cut to its first n_images digits."""
    import ldm.data.digits

    config = tmp_path / "tiny.yml"
    config.write_text(TINY_CONFIG)
    images, labels = ldm.data.digits.load_digits_split("train")
    monkeypatch.setattr(ldm.data.digits, "load_digits_split", lambda split: (images[:n_images], labels[:n_images]))
    return _script(), config


def test_training_resumes_bit_for_bit(tmp_path, monkeypatch):
    train, config = _tiny_run(tmp_path, monkeypatch, 32)
    flags = ["--config", str(config), "--steps", "5", "--batch_size", "4", "--warmup", "2", "--ckpt_every", "2",
             "--eval_samples", "0", "--no_progress"]
    clean = str(tmp_path / "clean.ckpt")
    train.main(flags + ["--work_dir", str(tmp_path / "a"), "--out", clean])

    # stop after 3 steps (a resumable checkpoint is written there), then rerun the same command without the stop
    resumed = str(tmp_path / "resumed.ckpt")
    train.main(flags + ["--work_dir", str(tmp_path / "b"), "--out", resumed, "--stop_after", "3"])
    assert not os.path.exists(resumed)
    train.main(flags + ["--work_dir", str(tmp_path / "b"), "--out", resumed])

    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (clean, resumed))
    assert a["training"]["state_dict_sha256"] == b["training"]["state_dict_sha256"]
    assert train.state_dict_sha256(a["state_dict"]) == a["training"]["state_dict_sha256"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not torch.equal(a["state_dict"]["conv_out.weight"], torch.zeros_like(a["state_dict"]["conv_out.weight"]))
    model = load_pixel_model(str(config), clean)  # the container loads with the safe loader
    assert model.training_record["args"]["steps"] == 5


def test_resume_refuses_other_flags(tmp_path, monkeypatch):
    from ldm.util import UserError

    train, config = _tiny_run(tmp_path, monkeypatch, 16)
    flags = ["--config", str(config), "--steps", "4", "--batch_size", "2", "--ckpt_every", "1", "--eval_samples", "0",
             "--no_progress", "--work_dir", str(tmp_path / "w"), "--out", str(tmp_path / "m.ckpt")]
    train.main(flags + ["--stop_after", "1"])
    with pytest.raises(UserError, match="different training arguments"):
        train.main(flags + ["--lr", "1e-3"])
