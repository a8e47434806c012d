"""TFMQ-DM through the numbered scripts (issue 13): 01 --calib_data fresh_per_step records TFMQ-DM's data and prints
its cost, 02 --method tfmqdm reconstructs (TIAR, blocks, FSC), 04 samples it directly on its own schedule and refuses
another in one sentence, and options of the other post-training method (or none) are refused in one sentence."""
import shutil

import pytest

from script_runner import assert_one_sentence, common, load_script, run_main, snapshot

Q01 = "quant_scripts/01_collect_input_4_calib.py"
Q02 = "quant_scripts/02_quantize_ldm_naive.py"
Q04 = "quant_scripts/04_sample_lora_model.py"
# the golden run's calib.pt: 4 DDIM steps x 2 trajectories (x2 rows with guidance), on the 4-step schedule
TFMQ = ("--method", "tfmqdm", "--n_bits_w", "4", "--n_bits_a", "8", "--cali_st", "2", "--cali_n", "2", "--fsc_n", "2",
        "--weight_iters", "2", "--tiar_iters", "2", "--weight_batch", "4", "--tiar_batch", "4", "--micro_batch", "4",
        "--act_init_n", "4", "--running_batch", "4", "--train_steps", "4")


@pytest.fixture(scope="module")
def tfmq_run(golden_run, tmp_path_factory):
    """A finished 02 --method tfmqdm (fsc paper) run on the golden run's calib.pt."""
    from ldm.util import cli_main

    run = tmp_path_factory.mktemp("tfmq_run")
    shutil.copy2(golden_run / "calib.pt", run / "calib.pt")
    cli_main(load_script(Q02).main, common(run) + list(TFMQ))
    return run


def test_artifact_has_per_step_sets_on_the_tib_only(tfmq_run):
    from ldm.presets import get_preset, load_model
    from quant.activation import TemporalActQuantizer
    from quant.api import build_from_meta
    from quant.artifacts import load_artifact
    from quant.reconstruct.tib import tib_layers

    art = load_artifact(tfmq_run / "naive.pt")
    meta = art["meta"]
    assert meta["method"] == "tfmqdm" and meta["training"] == "ptq" and meta["per_step"] is True
    assert meta["config"]["fsc"] == "paper" and meta["config"]["tiar"] is True and meta["calib_data"] == "trajectory"
    assert meta["n_calib_rows"] == 2 * 2 * 2 and set(meta["ptq_times"]) == {"tiar_s", "weight_s", "fsc_s"}
    assert not (tfmq_run / "recon").exists()
    preset = get_preset("digits")
    model = load_model(preset.family, preset.config_path, preset.ckpt_path, device="cpu")
    qunet = build_from_meta(model.model.diffusion_model, meta)
    qunet.load_state_dict(art["state_dict"])
    temporal = {n.rsplit(".", 1)[0] for n, m in qunet.unet.named_modules() if isinstance(m, TemporalActQuantizer)}
    assert temporal == set(tib_layers(qunet.unet)[2:])        # the ResBlocks' embedding linears, nothing else
    assert "time_embed.0" not in dict(qunet.quant_layers())   # FP


def test_04_samples_its_schedule_and_refuses_another(tfmq_run, tmp_path, capsys):
    for name in ("calib.pt", "naive.pt"):
        shutil.copy2(tfmq_run / name, tmp_path / name)
    code, _, err = run_main(Q04, common(tmp_path) + ["--n_samples", "2", "--batch_size", "2", "--ddim_steps", "4",
                                                     "--out", tmp_path / "s.npz"], capsys)
    assert code == 0, err
    before = snapshot(tmp_path)
    line = assert_one_sentence(*run_main(Q04, common(tmp_path) + ["--n_samples", "2", "--ddim_steps", "5", "--out",
                                                                  tmp_path / "s5.npz"], capsys)[::2])
    assert "has no scales for" in line and snapshot(tmp_path) == before


def test_fresh_per_step_data_then_released_fsc(tmp_path, capsys):
    code, out, err = run_main(Q01, common(tmp_path) + ["--calib_steps", "4", "--calib_batch", "2", "--calib_eta", "0",
                                                       "--calib_data", "fresh_per_step"], capsys)
    assert code == 0, err
    assert "calib_data fresh_per_step: 4 fresh runs per batch, 10 UNet calls" in out
    code, _, err = run_main(Q02, common(tmp_path) + list(TFMQ) + ["--fsc", "released", "--tiar", "off"], capsys)
    assert code == 0, err
    from quant.artifacts import load_artifact
    meta = load_artifact(tmp_path / "naive.pt")["meta"]
    assert meta["calib_data"] == "fresh_per_step" and meta["config"]["fsc"] == "released"
    assert meta["config"]["tiar"] is False and meta["per_step"] is True
    code, _, err = run_main(Q04, common(tmp_path) + ["--n_samples", "2", "--batch_size", "2", "--out",
                                                     tmp_path / "s.npz"], capsys)
    assert code == 0, err


QDIFF = ("--method", "qdiffusion", "--cali_st", "2", "--cali_n", "2", "--train_steps", "4")


@pytest.mark.parametrize("extra, fragment", [
    (list(QDIFF) + ["--fsc", "paper"], "--fsc is an option of tfmqdm, not of qdiffusion"),
    (list(QDIFF) + ["--tiar_iters", "5"], "--tiar_iters is an option of tfmqdm, not of qdiffusion"),
    (list(TFMQ) + ["--act_iters", "3"], "--act_iters is an option of qdiffusion, not of tfmqdm"),
    (list(TFMQ) + ["--split", "off"], "--split is an option of qdiffusion, not of tfmqdm"),
    (["--method", "mpqdm", "--tiar", "off"], "--tiar is a post-training reconstruction option"),
    (list(TFMQ) + ["--fsc", "released", "--softmax_bits", "16"], "at most 8 bits"),
    (list(TFMQ) + ["--fsc_n", "3"], "fsc_n must be between 1 and the 2 recorded trajectories"),
    (list(TFMQ[:-1]) + ["5"], "no rows at timestep"),       # --train_steps 5: calib.pt lacks its timesteps
])
def test_bad_tfmqdm_options_are_one_sentence(golden_run, tmp_path, capsys, extra, fragment):
    shutil.copy2(golden_run / "calib.pt", tmp_path / "calib.pt")
    before = snapshot(tmp_path)
    line = assert_one_sentence(*run_main(Q02, common(tmp_path) + extra, capsys)[::2])
    assert fragment in line and snapshot(tmp_path) == before
