"""Per-row metrics of the digits benchmark: quality against real digits and fidelity to the FP model's own samples.

DDIM with eta 0 is deterministic, so a quantized sample and the FP sample drawn from the same noise (same global
image index, same file order) should match; PSNR between the two measures fidelity to the FP model directly,
which FID cannot (on ImageNet quantized models often score a lower FID than FP).
"""
from functools import lru_cache

import numpy as np

from evaluation.digits_cnn import DigitsExtractor
from evaluation.evaluate import ADM_IS_SPLIT, score_features
from evaluation.metrics import FeatureStats, psnr
from evaluation.npz_io import load_npz_array, npz_keys
from evaluation.reference import reference_features
from ldm.util import UserError

# (record key, column title) in table order
DIGITS_METRIC_COLUMNS = (
    ("conditional_accuracy", "cond. acc."),
    ("FID", "FID real"),
    ("FID_fp", "FID to FP"),
    ("PSNR_fp", "PSNR vs FP (dB)"),
    ("sFID", "sFID"),
    ("IS", "IS"),
    ("precision", "precision"),
    ("recall", "recall"),
)
REAL_REFERENCE = "digits-train"


@lru_cache(maxsize=1)
def _extractor():
    return DigitsExtractor()


@lru_cache(maxsize=4)
def _features(path):
    images = load_npz_array(path, "arr_0")
    # unconditional samples (the pixel model) carry no labels: no conditional accuracy for them
    labels = load_npz_array(path, "arr_1").astype(np.int64) if "arr_1" in npz_keys(path) else None
    return images, labels, _extractor()(images)


def digits_row_metrics(samples_npz, fp_npz):
    """Metric values (floats) of one sample file; the FP file gives the paired and FP-relative columns."""
    images, labels, feats = _features(samples_npz)
    fp_images, fp_labels, fp_feats = _features(fp_npz)
    same_labels = (labels is None and fp_labels is None) or (
        labels is not None and fp_labels is not None and np.array_equal(labels, fp_labels))
    if images.shape != fp_images.shape or not same_labels:
        raise UserError(f"{samples_npz} and {fp_npz} are not drawn from the same noise and labels "
                        "(sample both with the same --n_samples, --batch_size and --seed)")
    ref = reference_features(REAL_REFERENCE, _extractor())
    metrics = score_features(feats, ref, min(ADM_IS_SPLIT, len(images)), labels)
    metrics["FID_fp"] = FeatureStats.from_features(feats["pool"]).frechet_distance(
        FeatureStats.from_features(fp_feats["pool"]))
    metrics["PSNR_fp"] = psnr(images, fp_images)
    return metrics


def format_metric(key, value):
    if value is None:
        return "–"
    if key in ("conditional_accuracy", "precision", "recall"):
        return f"{100 * value:.1f}%"
    if key == "PSNR_fp" and not np.isfinite(value):
        return "∞"
    if key.startswith(("FID", "sFID")):
        value = max(value, 0.0)  # a distance; identical sets can come out as -1e-12 in floating point
    return f"{value:.2f}" if key in ("IS", "PSNR_fp") else f"{value:.3f}"
