"""Q-Diffusion through the numbered scripts (issue 12): 02 --method qdiffusion reconstructs, 04 samples it directly,
03 refuses it, a killed 02 resumes per block, and the post-training options refuse bad combinations in one sentence."""
import os
import shutil

import pytest
import torch

from script_runner import assert_one_sentence, common, load_script, run_main, snapshot

Q02 = "quant_scripts/02_quantize_ldm_naive.py"
# the golden run's calib.pt has 4 steps x 2 trajectories (x2 rows with guidance)
PTQ = ("--method", "qdiffusion", "--n_bits_w", "4", "--n_bits_a", "8", "--cali_st", "2", "--cali_n", "2",
       "--weight_iters", "3", "--act_iters", "2", "--weight_batch", "4", "--act_batch", "4", "--micro_batch", "4",
       "--act_init_n", "8", "--train_steps", "4")


SOLVES = []  # solver calls (one per reconstructed unit and stage) of the unbroken ptq_run


@pytest.fixture(scope="module")
def ptq_run(golden_run, tmp_path_factory):
    """A finished 02 --method qdiffusion run on the golden run's calib.pt."""
    import quant.reconstruct.driver as driver
    from ldm.util import cli_main

    run = tmp_path_factory.mktemp("ptq_run")
    shutil.copy2(golden_run / "calib.pt", run / "calib.pt")
    real = driver.solve
    driver.solve = lambda *a, **k: SOLVES.append(1) or real(*a, **k)
    try:
        cli_main(load_script(Q02).main, common(run) + list(PTQ))
    finally:
        driver.solve = real
    return run


@pytest.fixture
def ptq_copy(ptq_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("calib.pt", "naive.pt"):
        shutil.copy2(ptq_run / name, run / name)
    return run


def test_artifact_is_a_complete_integer_model(ptq_run):
    from quant.artifacts import load_artifact
    from quant.api import build_from_meta
    from ldm.presets import get_preset, load_model

    art = load_artifact(ptq_run / "naive.pt")
    meta = art["meta"]
    assert meta["method"] == "qdiffusion" and meta["training"] == "ptq" and meta["per_step"] is False
    assert meta["n_calib_rows"] == 2 * 2 * 2            # cali_st steps x cali_n trajectories x {uncond, cond}
    assert meta["config"]["weight_iters"] == 3 and meta["config"]["cali_st"] == 2
    assert not (ptq_run / "recon").exists()             # the resume state is dropped once naive.pt holds the result
    preset = get_preset("digits")
    model = load_model(preset.family, preset.config_path, preset.ckpt_path, device="cpu")
    qunet = build_from_meta(model.model.diffusion_model, meta)
    qunet.load_state_dict(art["state_dict"])
    layers = qunet.quant_layers()
    assert any(layer.spec.split for _, layer in layers)  # the decoder skip convs, split from the structure
    for _, layer in layers:                              # hard-rounded: every weight on its channel's 4-bit grid
        for wq, part in layer.weight_quantizers():
            w = layer.weight[:, part].detach()
            shape = (-1,) + (1,) * (w.dim() - 1)
            codes = w / wq.delta.view(shape) + wq.zero.view(shape)
            assert torch.allclose(codes, codes.round(), atol=1e-3)
            assert codes.round().min() >= 0 and codes.round().max() <= 15


def test_04_samples_it_without_fine_tuning(ptq_copy, capsys):
    out = ptq_copy / "s.npz"
    code, _, err = run_main("quant_scripts/04_sample_lora_model.py",
                            common(ptq_copy) + ["--n_samples", "2", "--batch_size", "2", "--out", out], capsys)
    assert code == 0, err
    import numpy as np
    with np.load(out) as f:
        assert f["arr_0"].shape == (2, 32, 32, 3)
    # a per-step-free model samples any schedule, not only the 4 steps recorded in its meta
    code, _, err = run_main("quant_scripts/04_sample_lora_model.py",
                            common(ptq_copy) + ["--n_samples", "2", "--batch_size", "2", "--ddim_steps", "5",
                                                "--out", ptq_copy / "s3.npz"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("script, extra, fragment", [
    ("quant_scripts/03_train_mpqdm.py", ["--epochs", "1"], "has no fine-tuning step"),
    ("quant_scripts/04_sample_lora_model.py", ["--stage", "finetuned", "--n_samples", "2"], "--stage naive"),
    ("quant_scripts/06_export_packed.py", ["--stage", "finetuned"], "no fine-tuned stage"),
])
def test_later_stages_refuse_what_a_ptq_model_lacks(ptq_copy, capsys, script, extra, fragment):
    before = snapshot(ptq_copy)
    line = assert_one_sentence(*run_main(script, common(ptq_copy) + extra, capsys)[::2])
    assert fragment in line and snapshot(ptq_copy) == before


@pytest.mark.parametrize("extra, fragment", [
    (["--method", "mpqdm", "--cali_n", "3"], "--cali_n is a post-training reconstruction option"),
    (["--method", "efficientdm", "--max_cache_gb", "1"], "--max_cache_gb is a post-training"),
    (["--method", "mpqdm", "--restart"], "--restart discards"),
    (list(PTQ) + ["--trd_lambda", "3"], "--trd_lambda is an MPQ-DM option; qdiffusion"),
    (list(PTQ) + ["--n_calib", "8"], "--n_calib belongs to the fine-tuned methods' naive stage"),
    (list(PTQ) + ["--lora_rank", "4"], "--lora_rank belongs to the fine-tuned methods' naive stage"),
    (list(PTQ) + ["--cali_st", "9"], "cali_st must be between 1 and the 4 recorded sampling steps"),
    (list(PTQ) + ["--round_warmup", "1"], "round_warmup must be in [0, 1)"),
    (list(PTQ) + ["--beta_start", "1", "--beta_end", "2"], "beta must decay"),
])
def test_bad_ptq_options_are_one_sentence(golden_run, tmp_path, capsys, extra, fragment):
    shutil.copy2(golden_run / "calib.pt", tmp_path / "calib.pt")
    before = snapshot(tmp_path)
    line = assert_one_sentence(*run_main(Q02, common(tmp_path) + extra, capsys)[::2])
    assert fragment in line and snapshot(tmp_path) == before


def test_budget_below_one_micro_batch_is_one_sentence(golden_run, tmp_path, capsys):
    shutil.copy2(golden_run / "calib.pt", tmp_path / "calib.pt")
    line = assert_one_sentence(*run_main(Q02, common(tmp_path) + list(PTQ) + ["--max_cache_gb", "1e-9"],
                                         capsys)[::2])
    assert "one micro-batch" in line and not (tmp_path / "naive.pt").exists()


def test_cache_of_another_run_is_refused(golden_run, tmp_path, capsys, monkeypatch):
    """Two runs (other bits) sharing one --cache_dir: the second is refused while the first still owns it."""
    import quant.reconstruct.driver as driver

    cache = tmp_path / "cache"
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
        shutil.copy2(golden_run / "calib.pt", run / "calib.pt")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(driver, "solve", killed)            # run a is killed in its first block: it keeps the cache
    with pytest.raises(KeyboardInterrupt):
        load_script(Q02).main(common(runs[0]) + list(PTQ) + ["--cache_dir", str(cache)])
    monkeypatch.undo()
    other = list(PTQ)
    other[other.index("--n_bits_w") + 1] = "3"
    line = assert_one_sentence(*run_main(Q02, common(runs[1]) + other + ["--cache_dir", str(cache)], capsys)[::2])
    assert "belongs to another model" in line and "--restart" in line
    # --restart on run b takes the cache over
    code, _, err = run_main(Q02, common(runs[1]) + other + ["--cache_dir", str(cache), "--restart"], capsys)
    assert code == 0, err


def test_killed_reconstruction_resumes_per_block(golden_run, ptq_run, tmp_path, monkeypatch, capsys):
    """Kill 02 after three blocks; the re-run solves only the rest and writes the same model as an unbroken run."""
    import quant.reconstruct.driver as driver

    shutil.copy2(golden_run / "calib.pt", tmp_path / "calib.pt")
    real, calls = driver.solve, []

    def dies_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(driver, "solve", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        load_script(Q02).main(common(tmp_path) + list(PTQ))
    assert (tmp_path / "recon" / "state.json").exists() and not (tmp_path / "naive.pt").exists()

    resumed = []

    def counting(*args, **kwargs):
        resumed.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(driver, "solve", counting)
    code, _, err = run_main(Q02, common(tmp_path) + list(PTQ), capsys)
    assert code == 0, err
    assert len(SOLVES) > 6 and len(resumed) == len(SOLVES) - 3   # the three finished blocks were not redone
    from quant.artifacts import load_artifact
    ref = load_artifact(ptq_run / "naive.pt")["state_dict"]
    got = load_artifact(tmp_path / "naive.pt")["state_dict"]
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert not os.path.exists(tmp_path / "recon")
