"""Fixtures of the script tests: a small finished digits run whose artifacts the CLI tests copy and corrupt."""
import os
import shutil

import pytest

from script_runner import REPO, load_script

DIGITS_CKPT = os.path.join(REPO, "models/ldm/digits-ldm-vq-4/model.ckpt")
GOLDEN_FILES = ("calib.pt", "naive.pt", "finetuned.pt", "samples.npz")


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory):
    """A finished tiny digits run (01 -> 02 -> 03 -> 04, MPQ-DM W2A4, 4 steps, 1 epoch): the valid artifacts that
    the CLI tests corrupt. Tests copy it (copy_run) and never write here."""
    if not os.path.isfile(DIGITS_CKPT):
        pytest.skip("the shipped digits checkpoint is missing (scripts/train_digits_ldm.py)")
    run = tmp_path_factory.mktemp("golden_run")
    common = ["--preset", "digits", "--device", "cpu", "--run_dir", run, "--no_progress", "--threads", "1"]
    from ldm.util import cli_main

    cli_main(load_script("quant_scripts/01_collect_input_4_calib.py").main,
             [str(a) for a in common + ["--calib_steps", "4", "--calib_batch", "2"]])
    cli_main(load_script("quant_scripts/02_quantize_ldm_naive.py").main,
             [str(a) for a in common + ["--method", "mpqdm", "--n_bits_w", "2", "--n_bits_a", "4", "--n_calib", "8",
                                        "--train_steps", "4", "--lora_rank", "2"]])
    cli_main(load_script("quant_scripts/03_train_mpqdm.py").main,
             [str(a) for a in common + ["--epochs", "1", "--batch_size", "1", "--preview_every", "0"]])
    cli_main(load_script("quant_scripts/04_sample_lora_model.py").main,
             [str(a) for a in common + ["--n_samples", "4", "--batch_size", "4", "--classes", "1", "2"]])
    return run


@pytest.fixture
def copy_run(golden_run, tmp_path):
    """A fresh copy of the golden run's artifacts (no resume state, no previews)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in GOLDEN_FILES:
        shutil.copy2(golden_run / name, run / name)
    return run
