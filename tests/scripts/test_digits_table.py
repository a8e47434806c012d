"""benchmarks/digits_table.py --rows: only the matched rows (and FP) are measured, every other row's record is kept
from the existing table with the command that made it, and a table that cannot supply them is refused before any
work."""
import importlib.util
import json
import os

import pytest

from ldm.util import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _digits_table():
    spec = importlib.util.spec_from_file_location("digits_table", os.path.join(REPO, "benchmarks/digits_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(fid):
    return dict(IS=1.0, IS_std=0.0, FID=fid, sFID=1.0, precision=0.5, recall=0.5, conditional_accuracy=0.9,
                FID_fp=0.0, PSNR_fp=30.0)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """The demo profile with run_row and the scorer replaced: the scorer returns FID 1 + a per-call counter, so a
    record written by this run is told apart from a kept one (FID 100)."""
    dt = _digits_table()
    ran = []
    monkeypatch.setattr(dt, "run_row", lambda row, *a: ran.append(row["name"]) or {"seconds": 12.0})
    monkeypatch.setattr(dt, "digits_row_metrics", lambda npz, fp: _metrics(1.0 + len(ran)))
    out = tmp_path / "runs"
    os.makedirs(out / "calib")
    (out / "calib" / "calib.pt").write_bytes(b"")
    paths = ["--profile", "demo", "--out_dir", str(out), "--md", str(tmp_path / "t.md"), "--json",
             str(tmp_path / "t.json"), "--quiet"]
    return dt, ran, paths, tmp_path


def test_rows_measures_the_matches_and_keeps_the_rest(table):
    dt, ran, paths, tmp = table
    names = [r["name"] for r in dt.PROFILES["demo"]["rows"]]
    old = [dict(name=n, label=n, method="x", w_bits=2, a_bits=4, stage="finetuned", flags=[], seconds=1.0,
                epochs=16, command="python benchmarks/digits_table.py --profile demo", **_metrics(100.0))
           for n in names]
    (tmp / "t.json").write_text(json.dumps(old))
    dt.main(paths + ["--rows", "mpqdm*"])
    assert sorted(ran) == ["fp", "mpqdm-w2a4"]
    recs = {r["name"]: r for r in json.load(open(tmp / "t.json"))}
    assert [r for r in recs] == names  # the profile's order, every row
    for name in names:
        new = name in ran
        assert (recs[name]["FID"] != 100.0) == new
        assert recs[name]["command"].endswith("--rows 'mpqdm*'") == new
    md = (tmp / "t.md").read_text()
    assert "python benchmarks/digits_table.py --profile demo\n" in md and "--rows 'mpqdm*'" in md
    # the re-drawn FP row differs from the one the kept rows were scored against: the table says so
    assert "differ from those the kept rows were scored against" in md


def test_rows_refuses_before_any_work(table):
    dt, ran, paths, tmp = table
    with pytest.raises(UserError, match="matches no row"):
        dt.main(paths + ["--rows", "nosuchrow*"])
    with pytest.raises(UserError, match="does not exist"):
        dt.main(paths + ["--rows", "mpqdm*"])
    (tmp / "t.json").write_text(json.dumps([dict(name="fp", command="c")]))
    with pytest.raises(UserError, match="lacks these rows"):
        dt.main(paths + ["--rows", "mpqdm*"])
    assert ran == [] and not (tmp / "t.md").exists()


def test_run_row_returns_a_timing_record_for_every_row_kind(tmp_path):
    """FP and naive rows have no timing of their own: an empty record, which main reads like any other."""
    import argparse

    dt = _digits_table()
    args = argparse.Namespace(out_dir=str(tmp_path), preset="digits", n_samples=10, batch_size=10, seed=0)
    naive = next(r for r in dt.ABLATION_ROWS if r.get("stage") == "naive")
    for row in (dt.FP_ROW, naive):
        os.makedirs(tmp_path / row["name"])
        (tmp_path / row["name"] / "samples.npz").write_bytes(b"")  # finished: nothing to run
        assert dt.run_row(row, args, runner=None, calib=None) == {}
    ptq = dt.EDADM_ROWS[0]
    os.makedirs(tmp_path / ptq["name"])
    for name in ("calib.pt", "naive.pt", "samples.npz"):
        (tmp_path / ptq["name"] / name).write_bytes(b"")
    (tmp_path / ptq["name"] / "ptq_seconds.json").write_text('{"seconds": 5.0, "cpu_seconds": 4.0}')
    assert dt.run_row(ptq, args, runner=None, calib=None) == {"seconds": 5.0, "cpu_seconds": 4.0}
