"""05_evaluate.py and make_table.py end to end on real held-out digits."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from evaluation.evaluate import evaluate_npz
from ldm.data.digits import load_digits_split, to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def heldout_npz(tmp_path_factory):
    x, y = load_digits_split("heldout")
    path = tmp_path_factory.mktemp("digits") / "heldout_samples.npz"
    meta = json.dumps({"method": "mpqdm", "weight_bits": 4, "act_bits": 4, "sampler": "ddim", "steps": 20})
    np.savez(path, arr_0=to_uint8(x), arr_1=y.numpy(), meta=np.array(meta))
    return path


def test_cli_end_to_end_and_table(heldout_npz, tmp_path):
    out = tmp_path / "m.json"
    proc = _run("quant_scripts/05_evaluate.py", "digits-train", heldout_npz, "--extractor", "digits", "--out", out,
                "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "| heldout_samples.npz | digits-cnn | 360 |" in proc.stdout
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert result["num_samples"] == 360 and result["is_split_size"] == 360 and result["settings"]["steps"] == 20
    assert m["conditional_accuracy"] >= 0.97 and 7.0 < m["IS"] <= 10.0  # real digits: confident, balanced (7.65)
    assert 0 < m["FID"] < 50 and m["sFID"] > 0 and 0.5 < m["precision"] <= 1 and 0.5 < m["recall"] <= 1

    # real held-out digits against themselves: zero distances, full precision and recall
    same = evaluate_npz("digits-heldout", str(heldout_npz), "digits")
    assert same["metrics"]["FID"] == pytest.approx(0, abs=1e-6) and same["metrics"]["sFID"] == pytest.approx(0, abs=1e-6)
    assert same["metrics"]["precision"] == 1.0 and same["metrics"]["recall"] == 1.0
    same_path = tmp_path / "same.json"
    same_path.write_text(json.dumps(same))

    proc = _run("scripts/make_table.py", out, same_path, "--labels", "train-ref", "heldout-ref", "--baseline", out,
                "--out", tmp_path / "table.md")
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "table.md").read_text()
    assert "| train-ref | mpqdm | 4/4 | ddim 20 | digits-cnn | 360 |" in table and "+0.000" in table
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["train-ref", "heldout-ref"] and rows[1]["delta_FID"] < 0


def test_cli_user_errors(heldout_npz, tmp_path):
    missing = _run("quant_scripts/05_evaluate.py", "digits-train", tmp_path / "missing.npz", "--extractor", "digits")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "missing.npz" in missing.stderr


def _in_process(capsys, *argv):
    """Run 05_evaluate.py's main in this process (faster than a subprocess): (exit status, stdout, stderr)."""
    import importlib.util

    from ldm.util import cli_main

    spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "quant_scripts/05_evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        cli_main(module.main, list(map(str, argv)))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_bad_inputs_and_help(heldout_npz, tmp_path, capsys):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 32, 32, 3), np.float32))
    code, _, err = _in_process(capsys, "digits-heldout", tmp_path / "float.npz", "--extractor", "digits")
    assert code == 2 and "uint8" in err and len(err.strip().splitlines()) == 1

    code, _, err = _in_process(capsys, "digits-train", heldout_npz, "--extractor", "inception")
    assert code == 2 and "digits" in err

    code, _, err = _in_process(capsys, "digits-train", heldout_npz, "--is-split-size", "0")
    assert code == 2 and "split" in err

    code, helptext, _ = _in_process(capsys, "--help")
    assert code == 0
    for flag in ("--extractor", "--out", "--inception-weights", "--digits-weights", "--batch-size", "--device",
                 "--is-split-size", "--no-cache", "--no-precomputed", "--label", "digits-heldout"):
        assert flag in helptext
