"""EDA-DM through the numbered scripts (issue 14): 02 --method edadm selects its samples by TDAC and reconstructs with
FBR, records the selection in naive.pt, 04 samples it directly, 03 refuses it, and options EDA-DM has no use for (or
more samples than recorded trajectories) are refused in one sentence with nothing written."""
import shutil

import pytest

from script_runner import assert_one_sentence, common, load_script, run_main, snapshot

Q02 = "quant_scripts/02_quantize_ldm_naive.py"
Q03 = "quant_scripts/03_train_mpqdm.py"
Q04 = "quant_scripts/04_sample_lora_model.py"
# the golden run's calib.pt: 4 DDIM steps x 2 trajectories (x2 rows with guidance)
EDA = ("--method", "edadm", "--n_bits_w", "4", "--n_bits_a", "8", "--tdac_n", "2", "--weight_iters", "2",
       "--weight_batch", "4", "--running_batch", "4", "--micro_batch", "4", "--train_steps", "4")


@pytest.fixture(scope="module")
def eda_run(golden_run, tmp_path_factory):
    from ldm.util import cli_main

    run = tmp_path_factory.mktemp("eda_run")
    shutil.copy2(golden_run / "calib.pt", run / "calib.pt")
    cli_main(load_script(Q02).main, common(run) + list(EDA))
    return run


def test_artifact_records_the_selection_and_the_recipe(eda_run):
    from quant.artifacts import load_artifact

    meta = load_artifact(eda_run / "naive.pt")["meta"]
    cfg = meta["config"]
    assert meta["method"] == "edadm" and meta["training"] == "ptq" and meta["per_step"] is False
    assert (cfg["tdac"], cfg["tdac_n"], cfg["tdac_radius"], cfg["tdac_lambda"]) == (True, 2, 0.5, 1.2)
    # the digits preset at W4A8: the cin256-v2 W4A8 recipe (lr_w 0.5, lr_a 1e-4, add_loss 0.8), 2025 release
    assert (cfg["weight_lr"], cfg["act_lr"], cfg["add_loss"], cfg["qdrop"], cfg["release"]) == (0.5, 1e-4, 0.8, 0.5,
                                                                                               "2025")
    assert (cfg["weight_init"], cfg["act_scale_method"], cfg["running_momentum"]) == ("search", "search", 0.9)
    sel = meta["calib_selection"]
    assert sum(sel["counts"]) == 2 and len(sel["counts"]) == 4 and len(sel["density"]) == 4
    assert meta["n_calib_rows"] == 4 and set(meta["ptq_times"]) == {"act_init_s", "fbr_s"}
    assert not (eda_run / "recon").exists()


def test_04_samples_it_and_03_refuses_it(eda_run, tmp_path, capsys):
    for name in ("calib.pt", "naive.pt"):
        shutil.copy2(eda_run / name, tmp_path / name)
    code, _, err = run_main(Q04, common(tmp_path) + ["--n_samples", "2", "--batch_size", "2", "--ddim_steps", "5",
                                                     "--out", tmp_path / "s.npz"], capsys)
    assert code == 0, err                       # one activation set: any schedule
    before = snapshot(tmp_path)
    line = assert_one_sentence(*run_main(Q03, common(tmp_path) + ["--epochs", "1"], capsys)[::2])
    assert "post-training" in line and snapshot(tmp_path) == before


@pytest.mark.parametrize("extra, fragment", [
    (["--cali_st", "2"], "--cali_st is an option of qdiffusion and tfmqdm, not of edadm"),
    (["--round_lambda", "0.1"], "--round_lambda is an option of qdiffusion and tfmqdm, not of edadm"),
    (["--tdac_n", "3"], "needs 3 recorded trajectories; calib.pt holds 2"),
    (["--qdrop", "1"], "qdrop must be in [0, 1)"),
])
def test_bad_edadm_options_are_one_sentence(golden_run, tmp_path, capsys, extra, fragment):
    shutil.copy2(golden_run / "calib.pt", tmp_path / "calib.pt")
    before = snapshot(tmp_path)
    line = assert_one_sentence(*run_main(Q02, common(tmp_path) + list(EDA) + extra, capsys)[::2])
    assert fragment in line and snapshot(tmp_path) == before


def test_tdac_option_belongs_to_edadm(golden_run, tmp_path, capsys):
    shutil.copy2(golden_run / "calib.pt", tmp_path / "calib.pt")
    line = assert_one_sentence(*run_main(Q02, common(tmp_path) + ["--method", "qdiffusion", "--tdac", "off"],
                                         capsys)[::2])
    assert "--tdac is an option of edadm, not of qdiffusion" in line
