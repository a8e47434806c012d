"""benchmarks/budget_curve.py: integer-code counting against a hand computation, parse-time refusals, and a tiny
two-method curve whose snapshot-rebuilt students equal 03's own finetuned.pt and whose re-run skips every point."""
import argparse
import copy
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from ldm.util import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS_CKPT = os.path.join(REPO, "models/ldm/digits-ldm-vq-4/model.ckpt")


def _budget_curve():
    spec = importlib.util.spec_from_file_location("budget_curve", os.path.join(REPO, "benchmarks/budget_curve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _OneLayer:
    """The part of QuantUNet that weight_codes reads."""

    def __init__(self, layer):
        self.layer = layer

    def quant_layers(self):
        return [("lin", self.layer)]


def test_weight_codes_match_a_hand_computation():
    from quant.layers import LayerSpec, wrap_layer

    bc = _budget_curve()
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.26, -0.74, 0.5], [1.0, -3.0, 0.1]]))
    layer = wrap_layer(lin, LayerSpec(role="quant", w_bits=2, lora_rank=0, smoothing=True))
    with torch.no_grad():
        layer.smooth.copy_(torch.tensor([2.0, 1.0, 0.5]))
        layer.weight_quantizer.delta.copy_(torch.tensor([0.25, 1.0]))
        layer.weight_quantizer.zero.copy_(torch.tensor([1.4, 2.6]))   # rounded to 1 and 3 for the codes
        layer.weight_quantizer.bits.copy_(torch.tensor([2, 3], dtype=torch.int32))
    # W·s = [[0.52, -0.74, 0.25], [2, -3, 0.05]]; /Δ = [[2.08, -2.96, 1], [2, -3, 0.05]]
    # round + z = [[3, -2, 2], [5, 0, 3]]; clamp to [0, 3] and [0, 7]
    expected = torch.tensor([[3.0, 0.0, 2.0], [5.0, 0.0, 3.0]])
    codes = bc.weight_codes(_OneLayer(layer))["lin"]
    assert torch.equal(codes, expected)
    moved = codes.clone()
    moved[1, 2] = 4.0
    assert bc.codes_changed({"lin": codes}, {"lin": moved}) == (1, 6)


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "2", "--points", "0", "5"], "beyond --epochs"),
    (["--n_samples", "15"], "multiple of 10"),
    (["--config", "c.yaml"], "together"),
])
def test_bad_arguments_are_refused_before_any_work(flags, words, tmp_path):
    from ldm.util import UserError

    bc = _budget_curve()
    with pytest.raises(UserError, match=words):
        bc.main(flags + ["--out_dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_bad_flag_values_exit_2_at_parse_time(capsys):
    bc = _budget_curve()
    with pytest.raises(SystemExit) as err:
        bc.build_parser().parse_args(["--jobs", "0"])
    assert err.value.code == 2 and "positive integer" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(DIGITS_CKPT), reason="the digits checkpoint is not trained yet")
def test_tiny_curve_matches_finetuned_artifacts_and_resumes(tmp_path):
    from quant.api import build_from_meta
    from quant.artifacts import load_artifact

    bc = _budget_curve()
    out = tmp_path / "runs"
    argv = ["--epochs", "2", "--points", "0", "1", "2", "--n_samples", "20", "--batch_size", "20",
            "--methods", "efficientdm", "mpqdm", "--out_dir", str(out), "--md", str(tmp_path / "curve.md"), "--quiet"]
    records = bc.main(argv)
    assert [(r["method"], r["epoch"], r["iterations"]) for r in records] == \
        [(m, e, 20 * e) for m in ("efficientdm", "mpqdm") for e in (0, 1, 2)]
    assert all(r["codes_changed"] == 0 for r in records if r["epoch"] == 0)
    assert all(0.0 <= r["conditional_accuracy"] <= 1.0 and np.isfinite(r["FID"]) for r in records)

    model = bc.load_fp_model(argparse.Namespace(config=None, ckpt=None))
    for method in ("efficientdm", "mpqdm"):
        run_dir = out / method
        # the student rebuilt from naive.pt + the epoch-2 snapshot is 03's own finished model, tensor for tensor
        base, student, _ = bc.point_student(model, str(run_dir), 2)
        finetuned = load_artifact(run_dir / "finetuned.pt")
        assert finetuned["meta"]["finetune"]["lora_lr_scale"] == bc.METHODS[method][1]
        mine = student.state_dict()
        assert set(mine) == set(finetuned["state_dict"])
        assert all(torch.equal(mine[k], v) for k, v in finetuned["state_dict"].items())
        # the epoch-2 fraction, recomputed from finetuned.pt through quant.api
        again = build_from_meta(copy.deepcopy(model.model.diffusion_model), finetuned["meta"])
        again.load_state_dict(finetuned["state_dict"])
        changed, total = bc.codes_changed(bc.weight_codes(base), bc.weight_codes(again))
        last = next(r for r in records if r["method"] == method and r["epoch"] == 2)
        assert (last["codes_changed_count"], last["codes_total"]) == (changed, total)
        if method == "efficientdm":  # naive codes of EfficientDM are its stored integer weights
            codes = bc.weight_codes(base)
            for name, layer in base.quant_layers():
                if name in codes:
                    assert torch.equal(codes[name], layer.weight_int.float())

    logs = {m: (out / m / "log.txt").read_text() for m in ("efficientdm", "mpqdm")}
    again = bc.main(argv)  # every point is on disk: nothing is trained or sampled again
    assert [json.dumps(r, sort_keys=True) for r in again] == [json.dumps(r, sort_keys=True) for r in records]
    assert {m: (out / m / "log.txt").read_text() for m in logs} == logs
    text = (tmp_path / "curve.md").read_text()
    assert "python benchmarks/budget_curve.py --epochs 2" in text
    assert all(f"| EfficientDM | {e} | {20 * e} |" in text for e in (0, 1, 2))

    # --report_only: the same records from disk, nothing run, unfinished points listed
    partial = bc.main(["--epochs", "3", "--points", "0", "1", "2", "3", "--methods", "efficientdm", "mpqdm", "--out_dir",
                       str(out), "--md", str(tmp_path / "partial.md"), "--quiet", "--report_only"])
    assert [json.dumps(r, sort_keys=True) for r in partial] == [json.dumps(r, sort_keys=True) for r in records]
    assert {m: (out / m / "log.txt").read_text() for m in logs} == logs
    text = (tmp_path / "partial.md").read_text()
    assert "Not measured yet" in text and "EfficientDM: epoch 3" in text and "last point every run reached" in text
    with pytest.raises(UserError, match="no finished points"):
        bc.main(["--out_dir", str(tmp_path / "empty"), "--md", str(tmp_path / "e.md"), "--report_only"])
