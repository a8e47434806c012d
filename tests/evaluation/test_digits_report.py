"""benchmarks' per-row digits metrics (evaluation.digits_report) on labelled and on unconditional sample files."""
import numpy as np
import pytest

from evaluation.digits_report import digits_row_metrics
from evaluation.metrics import psnr
from ldm.data.digits import load_digits_split
from ldm.generate import to_uint8_nhwc
from ldm.util import UserError


def _write(path, images, labels=None):
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_split("heldout")
    return to_uint8_nhwc(x[:60]), y[:60].numpy().astype(np.int64)


def test_unconditional_rows_have_no_accuracy_and_pair_by_index(digits, tmp_path):
    images, _ = digits
    noisy = np.clip(images.astype(int) + np.random.default_rng(0).integers(-20, 21, images.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    fp = _write(tmp_path / "fp.npz", images)
    row = digits_row_metrics(_write(tmp_path / "q.npz", noisy), fp)
    assert "conditional_accuracy" not in row
    assert row["PSNR_fp"] == pytest.approx(psnr(noisy, images))   # paired image i with image i
    same = digits_row_metrics(fp, fp)
    assert same["PSNR_fp"] == float("inf") and abs(same["FID_fp"]) < 1e-6


def test_labelled_rows_score_accuracy_and_refuse_mixed_files(digits, tmp_path):
    images, labels = digits
    fp = _write(tmp_path / "fp.npz", images, labels)
    row = digits_row_metrics(_write(tmp_path / "q.npz", images, labels), fp)
    assert row["conditional_accuracy"] > 0.9            # real held-out digits under the digits CNN
    wrong = digits_row_metrics(_write(tmp_path / "w.npz", images, (labels + 1) % 10), _write(tmp_path / "fp2.npz",
                                                                                            images, (labels + 1) % 10))
    assert wrong["conditional_accuracy"] < 0.2         # the labels really enter
    with pytest.raises(UserError, match="same noise"):
        digits_row_metrics(_write(tmp_path / "u.npz", images), fp)   # unlabelled against labelled
