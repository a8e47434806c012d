"""quant_scripts 01 -> 04 end to end on the digits model (or, until its checkpoint exists, a randomly initialised
LDM with the digits config), with a few steps and epochs; plus the user-error contract (one sentence, exit 2)."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "quant_scripts")
DIGITS_CONFIG = os.path.join(REPO, "configs/latent-diffusion/digits-ldm-vq-4.yaml")
DIGITS_CKPT = os.path.join(REPO, "models/ldm/digits-ldm-vq-4/model.ckpt")


def _script(name):
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), os.path.join(SCRIPTS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




@pytest.fixture(scope="module")
def model_args(tmp_path_factory):
    """Flags selecting the model: the shipped digits checkpoint, else random weights with its config."""
    if os.path.isfile(DIGITS_CKPT):
        return ["--preset", "digits", "--device", "cpu"]
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(DIGITS_CONFIG).model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero output convs, so the student has something to match
        for name, p in model.model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_((1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise) if p.dim() == 1
                    else noise / max(1, p[0].numel()) ** 0.5)
    ckpt = tmp_path_factory.mktemp("digits_random") / "model.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return ["--preset", "digits", "--device", "cpu", "--config", DIGITS_CONFIG, "--ckpt", str(ckpt)]


def test_pipeline_01_to_04(model_args, tmp_path):
    from quant.artifacts import load_artifact
    run = ["--run_dir", str(tmp_path), "--no_progress"] + model_args
    _script("01_collect_input_4_calib.py").main(run + ["--calib_steps", "5", "--calib_batch", "2"])
    calib = load_artifact(tmp_path / "calib.pt")
    assert calib["x"].shape == (5 * 4, 3, 8, 8) and calib["context"].shape == (20, 1, 64)
    assert calib["meta"]["calib_timesteps"] == [1, 201, 401, 601, 801]
    # per step: uncond rows (null class 10) first, then cond rows; entries in sampling order (t descending)
    assert calib["t"].view(5, 4)[:, 0].tolist() == [801, 601, 401, 201, 1]

    _script("02_quantize_ldm_naive.py").main(run + ["--method", "mpqdm", "--n_bits_w", "2", "--n_bits_a", "4",
                                                    "--n_calib", "8", "--train_steps", "4", "--lora_rank", "4"])
    naive = load_artifact(tmp_path / "naive.pt")
    meta = naive["meta"]
    assert (meta["method"], meta["n_bits_w"], meta["n_bits_a"], meta["trd_mode"]) == ("mpqdm", 2, 4, "paper")
    assert meta["timesteps"] == [1, 251, 501, 751] and meta["omq_choice"]

    _script("03_train_mpqdm.py").main(run + ["--epochs", "2", "--batch_size", "2", "--preview_every", "1",
                                             "--checkpoint_every", "1", "--n_bits_w", "2"])
    tuned = load_artifact(tmp_path / "finetuned.pt")
    assert tuned["meta"]["stage"] == "finetuned" and len(tuned["meta"]["history"]) == 2
    assert len(list((tmp_path / "previews").glob("*.png"))) == 2
    lora_b = [v for k, v in tuned["state_dict"].items() if k.endswith("lora_B")]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # LoRA moved away from its zero init

    _script("04_sample_lora_model.py").main(run + ["--n_samples", "4", "--batch_size", "4", "--classes", "3", "7"])
    with np.load(tmp_path / "samples.npz") as data:
        assert data["arr_0"].shape == (4, 32, 32, 3) and data["arr_0"].dtype == np.uint8
        assert sorted(data["arr_1"].tolist()) == [3, 3, 7, 7]
        assert '"quant_method": "mpqdm"' in str(data["meta"])

    # the same run dir refuses artifacts made with other settings, with one sentence and exit status 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(SCRIPTS, "04_sample_lora_model.py")] + run + [
        "--n_bits_w", "4", "--n_samples", "4", "--batch_size", "4", "--out", str(tmp_path / "other.npz")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "n_bits_w" in lines[0] and "Traceback" not in proc.stderr


def test_user_errors_exit_2(model_args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(script, *extra):
        cmd = [sys.executable, os.path.join(SCRIPTS, script), "--run_dir", str(tmp_path), "--no_progress",
               *model_args, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)

    missing = run("03_train_mpqdm.py", "--epochs", "1")
    assert missing.returncode == 2 and "naive.pt" in missing.stderr and "02_quantize_ldm_naive" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bits = run("02_quantize_ldm_naive.py", "--n_bits_w", "9")
    assert bits.returncode == 2 and "--n_bits_w" in bits.stderr and "between 2 and 8" in bits.stderr
    assert len(bits.stderr.strip().splitlines()) == 1
    plus = run("02_quantize_ldm_naive.py", "--n_bits_w", "8", "--method", "mpqdm")  # b+1 = 9 bits: method rule
    assert plus.returncode == 2 and "between 1 and 8" in plus.stderr and len(plus.stderr.strip().splitlines()) == 1


def test_meta_mismatch_other_model(model_args, tmp_path):
    """An artifact made from another model (config hash) is refused naming the field and both values."""
    from ldm.util import UserError
    from quant.artifacts import save_artifact
    save_artifact(tmp_path / "calib.pt", {"preset": "digits", "config_hash": "0000000000000000",
                                          "model_fingerprint": "x", "use_ema": False, "stage": "calib"},
                  x=torch.zeros(1), t=torch.zeros(1, dtype=torch.long))
    with pytest.raises(UserError) as err:
        _script("02_quantize_ldm_naive.py").main(["--run_dir", str(tmp_path), *model_args])
    assert "config_hash='0000000000000000'" in str(err.value) and "expected" in str(err.value)


@pytest.mark.parametrize("script", ["01_collect_input_4_calib.py", "02_quantize_ldm_naive.py",
                                    "03_train_mpqdm.py", "04_sample_lora_model.py"])
def test_help_documents_every_flag(script, capsys):
    module = _script(script)
    text = module.build_parser().format_help()
    for action in module.build_parser()._actions:
        if action.help not in (None, "==SUPPRESS==") and action.option_strings:
            assert action.option_strings[0] in text
            assert action.help.strip(), action.option_strings
