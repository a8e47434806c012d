"""One explicit regression test per case reproduced in issue 10 (scripts, artifacts, I/O, configs, sampling files).

Each bad input must end with one sentence on stderr and exit status 2, leaving run_dir unchanged; where the input
was valid, it must work. The property-based test (test_cli_property.py) covers the same ground systematically;
these rows keep the issue's exact commands. The GPU cases are in tests/ldm/test_cli.py (device resolution) and
tests/quant/test_lora.py (LoRA init with a generator on another device); evaluation in tests/evaluation.
"""
import errno
import os
import shutil
import stat
import time

import numpy as np
import pytest
import torch

from script_runner import assert_one_sentence, common, load_script, run_main, snapshot

pytestmark = pytest.mark.slow  # shares the golden run of test_cli_property.py (built once per session)

S01, S02, S03 = ("quant_scripts/01_collect_input_4_calib.py", "quant_scripts/02_quantize_ldm_naive.py",
                 "quant_scripts/03_train_mpqdm.py")
S04, S05, S06 = ("quant_scripts/04_sample_lora_model.py", "quant_scripts/05_evaluate.py",
                 "quant_scripts/06_export_packed.py")
SAMPLE = "scripts/sample_diffusion.py"
DIGITS_CONFIG = "configs/latent-diffusion/digits-ldm-vq-4.yaml"


@pytest.mark.parametrize("script, extra, fragment", [
    (S04, ["--ddim_steps=-5"], "--ddim_steps"),                      # wrote decoded noise, exit 0
    (S04, ["--ddim_steps", "0"], "--ddim_steps"),                     # silently meant 20
    (S04, ["--ddim_steps", "3"], "does not fit"),
    (S04, ["--max_shards=-1"], "--max_shards"),                       # meant "all but the last"
    (S01, ["--calib_steps", "3"], "does not fit"),                    # IndexError traceback
    (S01, ["--calib_steps", "2000"], "does not fit"),                 # ValueError traceback
    (S01, ["--calib_eta", "nan"], "--calib_eta"),                     # poisoned calib.pt
    (S03, ["--eta", "nan"], "--eta"),                                 # max(0.0, nan) trajectory
    (S03, ["--lora_lr_scale", "nan"], "--lora_lr_scale"),
    (S03, ["--lora_lr_scale=-1"], "--lora_lr_scale"),
    (S03, ["--lora_lr_scale", "0"], "--lora_lr_scale"),               # ZeroDivisionError after epoch 1
    (S03, ["--device", "tpu"], "--device"),
    (S03, ["--threads=-2"], "--threads"),
    (S02, ["--n_bits_w", "9"], "--n_bits_w"),
])
def test_bad_flags_of_the_issue(script, extra, fragment, copy_run, capsys):
    before = snapshot(copy_run)
    code, _, err = run_main(script, common(copy_run) + extra, capsys)
    assert fragment in assert_one_sentence(code, err)
    assert snapshot(copy_run) == before


def test_sample_diffusion_ddim_steps_zero(tmp_path, capsys):
    for steps in ("0", "3"):
        code, _, err = run_main(SAMPLE, ["--preset", "digits", "--ddim_steps", steps, "--out", tmp_path / "x.npz"],
                                capsys)
        assert "--ddim_steps" in assert_one_sentence(code, err)
    assert os.listdir(tmp_path) == []


def test_naive_pt_passed_as_calib_pt(copy_run, capsys):
    shutil.copy2(copy_run / "naive.pt", copy_run / "calib.pt")
    code, _, err = run_main(S02, common(copy_run) + ["--n_calib", "8", "--train_steps", "4"], capsys)
    line = assert_one_sentence(code, err)
    assert "'naive' artifact, not the 'calib' one" in line and "01_collect_input_4_calib" in line


def _resave(path, edit):
    from quant.artifacts import save_artifact
    obj = torch.load(path, weights_only=True)
    edit(obj)
    meta = obj.pop("meta")
    save_artifact(path, meta, parent=meta["parent"], **obj)


def test_artifact_without_state_dict_or_with_a_wrong_shape(golden_run, copy_run, capsys):
    _resave(copy_run / "naive.pt", lambda obj: obj.pop("state_dict"))
    code, _, err = run_main(S03, common(copy_run) + ["--epochs", "1"], capsys)
    assert "holds no 'state_dict'" in assert_one_sentence(code, err)

    shutil.copy2(golden_run / "naive.pt", copy_run / "naive.pt")  # intact again, then one tensor reshaped
    _resave(copy_run / "naive.pt", lambda obj: obj["state_dict"].update({"unet.out.2.weight": torch.zeros(3, 7, 3, 3)}))
    code, _, err = run_main(S03, common(copy_run) + ["--epochs", "1"], capsys)
    line = assert_one_sentence(code, err)
    assert "unet.out.2.weight has shape (3, 7, 3, 3)" in line and "re-run quant_scripts/02" in line


def test_flipped_bytes_are_refused(copy_run, capsys):
    path = copy_run / "naive.pt"
    raw = bytearray(path.read_bytes())
    marker = torch.load(path, weights_only=True)["state_dict"]["unet.out.2.weight"].numpy().tobytes()[:64]
    at = bytes(raw).index(marker)  # inside a tensor's storage: zip and pickle still read fine
    raw[at + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["meta"]["stage"] == "naive"  # the damage is silent to torch
    before = snapshot(copy_run)
    code, _, err = run_main(S03, common(copy_run) + ["--epochs", "1"], capsys)
    assert "is corrupt (checksum mismatch); re-run quant_scripts/02" in assert_one_sentence(code, err)
    assert snapshot(copy_run) == before


def test_stale_w2a4_finetuned_next_to_a_new_w4a8_naive(copy_run, capsys):
    code, _, err = run_main(S02, common(copy_run) + ["--method", "mpqdm", "--n_bits_w", "4", "--n_bits_a", "8",
                                                     "--n_calib", "8", "--train_steps", "4", "--lora_rank", "2"],
                            capsys)
    assert code == 0, err
    before = snapshot(copy_run)
    for script, extra in ((S04, ["--n_samples", "2", "--out", copy_run / "new.npz"]), (S06, [])):
        code, _, err = run_main(script, common(copy_run) + extra, capsys)
        line = assert_one_sentence(code, err)
        assert "stale" in line and "re-run quant_scripts/03_train_mpqdm.py" in line
    assert snapshot(copy_run) == before


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_read_only_run_dir_is_refused_before_any_work(copy_run, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EROFS, "Read-only file system")))
    code, _, err = run_main(S01, common(copy_run / "sub") + ["--calib_steps", "4"], capsys)
    line = assert_one_sentence(code, err)
    assert "run_dir" in line and "not writable" in line and "Read-only file system" in line


def test_full_disk_at_the_final_write_keeps_every_epoch(copy_run, monkeypatch, capsys):
    import quant.artifacts

    args = common(copy_run) + ["--epochs", "2", "--batch_size", "1", "--checkpoint_every", "0", "--preview_every",
                               "0"]
    os.remove(copy_run / "finetuned.pt")
    with monkeypatch.context() as patch:
        patch.setattr(quant.artifacts, "atomic_save", _enospc)
        code, _, err = run_main(S03, args, capsys)
    line = assert_one_sentence(code, err)
    assert str(copy_run / "finetuned.pt") in line and "No space left" in line and "keeps all 2 epochs" in line
    assert not (copy_run / "finetuned.pt").exists()
    state = torch.load(copy_run / "finetune_state.pt", weights_only=True)
    assert state["meta"]["epoch"] == 2
    code, out, err = run_main(S03, args, capsys)  # the re-run trains nothing and writes the file
    assert code == 0, err
    assert "resuming fine-tuning" in out and "epoch 2/2" in out
    assert len(torch.load(copy_run / "finetuned.pt", weights_only=True)["meta"]["history"]) == 2


def test_failed_preview_write_keeps_the_epoch(copy_run, monkeypatch, capsys):
    import quant.stages.finetune as ft

    monkeypatch.setattr(ft, "atomic_write_bytes", _enospc)
    code, _, err = run_main(S03, common(copy_run) + ["--epochs", "3", "--batch_size", "1", "--checkpoint_every",
                                                     "0", "--preview_every", "1", "--restart"], capsys)
    line = assert_one_sentence(code, err)
    assert "preview_epoch00001.png" in line and "holds epoch 1" in line
    assert torch.load(copy_run / "finetune_state.pt", weights_only=True)["meta"]["epoch"] == 1


def test_divergence_advice_can_be_followed():
    from quant.stages.finetune import FinetuneDiverged

    script = load_script(S03)
    args = type("Args", (), {"lora_lr_scale": 1.0})()
    first = script.diverged_advice(FinetuneDiverged("fine-tuning diverged: 5 consecutive non-finite steps "
                                                    "(epoch 0, step 3)", 0, 3, None), args)
    assert "resum" not in first and "before any checkpoint" in first and "--lora_lr_scale" in first
    later = script.diverged_advice(FinetuneDiverged("fine-tuning diverged: ...", 7, 1, 4), args)
    assert "--restart" in later and "epoch 4" in later and "keep its learning rates" in later


def test_corrupt_safetensors_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{not json")
    code, _, err = run_main(SAMPLE, ["--config", DIGITS_CONFIG, "--ckpt", bad, "--out", tmp_path / "o.npz"], capsys)
    assert "x.safetensors" in assert_one_sentence(code, err)
    code, _, err = run_main(S01, common(tmp_path / "run") + ["--config", DIGITS_CONFIG, "--ckpt", bad], capsys)
    assert "not a valid safetensors file" in assert_one_sentence(code, err)


def test_evaluate_bad_inputs(golden_run, tmp_path, capsys):
    samples = golden_run / "samples.npz"
    base = ["digits-train", samples, "--extractor", "digits", "--out", tmp_path / "m.json", "--no-progress"]
    code, _, err = run_main(S05, base + ["--batch-size=-4"], capsys)  # KeyError: 'logits'
    assert "--batch-size" in assert_one_sentence(code, err)
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"garbage")
    code, _, err = run_main(S05, base + ["--digits-weights", bad], capsys)
    assert "not a readable digits classifier" in assert_one_sentence(code, err)
    with np.load(samples) as data:
        np.savez(tmp_path / "labels.npz", arr_0=data["arr_0"], arr_1=data["arr_1"] + 100)  # accepted, scored 0%
    code, _, err = run_main(S05, ["digits-train", tmp_path / "labels.npz", "--extractor", "digits", "--no-progress"],
                            capsys)
    assert "outside the classifier's classes" in assert_one_sentence(code, err)
    assert sorted(os.listdir(tmp_path)) == ["labels.npz", "w.safetensors"]


def test_config_target_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"model:\n  target: os.system\n  params:\n    command: touch {marker}\n")
    code, _, err = run_main(SAMPLE, ["--config", evil, "--ckpt", tmp_path / "x.ckpt", "--out", tmp_path / "o.npz"],
                            capsys)
    line = assert_one_sentence(code, err)
    assert "os.system" in line and "--trust_config" in line and not marker.exists()
    nested = tmp_path / "nested.yaml"  # a foreign target deep inside an otherwise valid config
    nested.write_text(open(DIGITS_CONFIG).read().replace("torch.nn.Identity", "subprocess.Popen"))
    code, _, err = run_main(S01, common(tmp_path / "run") + ["--config", nested, "--ckpt", tmp_path / "x.ckpt"],
                            capsys)
    assert "subprocess.Popen" in assert_one_sentence(code, err)


def test_samples_npz_has_the_permissions_of_its_grid(golden_run):
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: stat.S_IMODE(os.stat(golden_run / name).st_mode) for name in ("samples.npz", "samples_grid.png")}
    assert modes["samples.npz"] == modes["samples_grid.png"] == 0o666 & ~umask


def test_stale_tmp_files_of_a_killed_run_are_removed(copy_run, capsys):
    from ldm.util import STALE_MARGIN_S, TMP_PREFIX

    old = time.time() - STALE_MARGIN_S - 3600
    files = {"stale": copy_run / f"{TMP_PREFIX}abcnaive.pt", "fresh": copy_run / f"{TMP_PREFIX}defnaive.pt",
             "other": copy_run / "notes.tmp"}
    for path in files.values():
        path.write_bytes(b"x")
    for key in ("stale", "other"):
        os.utime(files[key], (old, old))
    code, _, err = run_main(S04, common(copy_run) + ["--n_samples", "2", "--max_shards", "1", "--batch_size", "1",
                                                     "--shard_size", "1", "--out", copy_run / "s2.npz"], capsys)
    assert code == 0, err
    assert not files["stale"].exists() and files["fresh"].exists() and files["other"].exists()
    assert sorted(os.listdir(copy_run / "s2.npz.shards")) == ["shard_00000.json", "shard_00000.npy"]  # at most 1


def test_atomic_writes_fsync_before_rename(tmp_path, monkeypatch):
    import ldm.util

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ldm.util.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(ldm.util.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    ldm.util.atomic_save({"w": torch.ones(2)}, tmp_path / "a.pt")
    assert events == ["fsync", "rename"]
    events.clear()
    ldm.util.atomic_write_bytes(tmp_path / "b.bin", b"data")
    assert events == ["fsync", "rename"]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], torch.ones(2))


def test_efficientdm_naive_stage_and_its_mpqdm_only_flags(copy_run, capsys):
    """Valid input still works: EfficientDM at stage 02 (its MPQ-DM-only flags are refused only when given)."""
    args = common(copy_run) + ["--method", "efficientdm", "--n_bits_w", "4", "--n_bits_a", "8", "--n_calib", "8",
                               "--train_steps", "4", "--lora_rank", "2"]
    code, _, err = run_main(S02, args + ["--omq", "off"], capsys)
    assert "--omq is an MPQ-DM option" in assert_one_sentence(code, err)
    code, out, err = run_main(S02, args, capsys)
    assert code == 0, err
    assert torch.load(copy_run / "naive.pt", weights_only=True)["meta"]["method"] == "efficientdm"
