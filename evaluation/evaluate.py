"""Evaluate a sample `.npz` against a reference: IS, FID, sFID, precision, recall (+ conditional accuracy).

The ADM evaluator's reading of two .npz files, with the feature extractor as a parameter:
  "inception" : torch-fidelity's port of the TF InceptionV3 (the paper protocol, EVALUATION.md section 1);
  "digits"    : the shipped digits CNN (embedded benchmark; 10 classes, so IS is at most 10).
"""
import os
import time

import numpy as np

from evaluation.metrics import (PR_DISTANCES, FeatureStats, conditional_accuracy, inception_score,
                                precision_recall)
from evaluation.npz_io import check_image_array, load_npz_array, npz_keys, read_npz_meta
from evaluation.reference import DIGITS_REFERENCES, extract_npz, reference_features
from ldm.util import UserError

EXTRACTORS = ("inception", "digits")
ADM_IS_SPLIT = 5000
PR_K = 3
TOOLKIT_VERSION = "0.1.0"


def make_extractor(name, weights_path=None, batch_size=None, device="cpu"):
    if name == "inception":
        from evaluation.inception import InceptionExtractor

        return InceptionExtractor(weights_path, batch_size=batch_size or 64, device=device)
    if name == "digits":
        from evaluation.digits_cnn import DigitsExtractor

        return DigitsExtractor(weights_path, batch_size=batch_size or 500, device=device)
    raise UserError(f"unknown extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")


def _labels(sample_path, n):
    if "arr_1" not in npz_keys(sample_path):
        return None
    labels = load_npz_array(sample_path, "arr_1")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{sample_path}:arr_1 must hold {n} integer class labels, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def resolve_pr_distances(choice, extractor, ref_path):
    """"auto" -> "fp16" (the ADM evaluator's float16 distance blocks) for an ADM reference batch scored with
    Inception, else "fp32"; an explicit "fp16" / "fp32" is kept."""
    if choice not in ("auto",) + PR_DISTANCES:
        raise UserError(f"pr_distances must be auto, fp16 or fp32, got {choice!r}")
    if choice != "auto":
        return choice
    return "fp16" if extractor == "inception" and ref_path not in DIGITS_REFERENCES else "fp32"


def score_features(feats, ref, is_split_size, labels=None, pr_distances="fp32"):
    """IS, FID, sFID, precision, recall (+ conditional accuracy when labels are given) of extracted features
    against a ReferenceFeatures; a metric the reference cannot support is None. pr_distances: "fp32" or "fp16"
    (ADM's float16 distance blocks) for precision/recall."""
    is_mean, is_std = inception_score(feats["logits"], split_size=is_split_size)
    fid = FeatureStats.from_features(feats["pool"]).frechet_distance(ref.pool_stats)
    sfid = (FeatureStats.from_features(feats["spatial"]).frechet_distance(ref.spatial_stats)
            if ref.spatial_stats is not None else None)
    if ref.pool is not None:
        precision, recall = precision_recall(ref.pool, feats["pool"], k=PR_K, distances=pr_distances)
    else:
        precision = recall = None
    metrics = {"IS": is_mean, "IS_std": is_std, "FID": fid, "sFID": sfid, "precision": precision, "recall": recall}
    if labels is not None:
        metrics["conditional_accuracy"] = conditional_accuracy(feats["logits"].argmax(axis=1), labels)
    return metrics


def evaluate_npz(ref_path, sample_path, extractor="digits", *, weights_path=None, batch_size=None, device="cpu",
                 is_split_size=None, use_cache=True, use_precomputed=True, progress=False, extractor_obj=None,
                 pr_distances="auto"):
    """Metrics of the samples in `sample_path` (ADM .npz) against `ref_path` as a JSON-ready dict.

    ref_path: an ADM reference .npz, or for the digits extractor `digits-train` / `digits-heldout`.
    is_split_size: IS split; default 5000 (ADM) for Inception and min(5000, N) for digits.
    extractor_obj: an already built extractor (tests, or several evaluations in one process).
    pr_distances: "auto" (ADM's float16 distances for an ADM reference batch with Inception, else float32),
    "fp16" or "fp32"; the choice is recorded in the result.
    """
    start = time.time()
    if batch_size is not None and batch_size < 1:
        raise UserError(f"the batch size must be positive, got {batch_size}")
    distances = resolve_pr_distances(pr_distances, extractor, ref_path)
    if ref_path in DIGITS_REFERENCES and extractor != "digits":
        raise UserError(f"the reference {ref_path} is only defined for --extractor digits")
    if ref_path not in DIGITS_REFERENCES and not os.path.isfile(ref_path):
        raise UserError(f"reference {ref_path} does not exist; pass an ADM reference .npz"
                        + (" or digits-train / digits-heldout" if extractor == "digits" else ""))
    shape = check_image_array(sample_path)
    n = shape[0]
    labels = _labels(sample_path, n)
    meta = read_npz_meta(sample_path)
    ext = extractor_obj or make_extractor(extractor, weights_path, batch_size, device)
    n_classes = getattr(ext, "num_classes", None)
    if extractor == "digits" and labels is not None and n_classes is not None and (
            labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(f"{sample_path}:arr_1 holds labels outside the classifier's classes 0..{n_classes - 1} "
                        f"(from {int(labels.min())} to {int(labels.max())}); conditional accuracy would be "
                        "meaningless")

    ref = reference_features(ref_path, ext, use_cache=use_cache, use_precomputed=use_precomputed, progress=progress)
    feats = extract_npz(sample_path, ext, progress=progress)

    split = int(is_split_size or (ADM_IS_SPLIT if extractor == "inception" else min(ADM_IS_SPLIT, n)))
    metrics = score_features(feats, ref, split, labels if extractor == "digits" else None, distances)

    return {
        "metrics": metrics,
        "num_samples": int(n),
        "image_shape": list(shape[1:]),
        "class_conditional": labels is not None,
        "evaluator": dict(ext.describe(), toolkit_version=TOOLKIT_VERSION,
                          note=("torch-fidelity port of the ADM TF InceptionV3, not the TF graph itself"
                                if extractor == "inception" else "digits CNN (embedded benchmark)")),
        "is_split_size": split,
        "is_split_rule": "ADM: contiguous splits in file order, mean of split scores" + (
            "" if extractor == "inception" else "; digits uses min(5000, N)"),
        "pr_k": PR_K,
        "pr_distances": distances,
        "pr_distances_rule": ("ADM DistanceBlock: float16 features and distance blocks (float32 for a block that "
                              "overflows)" if distances == "fp16" else "float32 distances"),
        "reference": ref.info,
        "samples": {"path": os.path.abspath(sample_path)},
        "settings": meta,
        "eval_seconds": round(time.time() - start, 2),
    }


TABLE_COLUMNS = ("IS", "FID", "sFID", "precision", "recall", "conditional_accuracy")


def format_value(name, value):
    if value is None:
        return "–"
    if name in ("precision", "recall", "conditional_accuracy"):
        return f"{100 * value:.2f}%"
    return f"{value:.2f}" if name == "IS" else f"{value:.3f}"


def table_row(result, label=None):
    """One Markdown table row: label | extractor | N | IS | FID | sFID | Prec | Rec | Acc."""
    m = result["metrics"]
    cells = [label or os.path.basename(result["samples"]["path"]), result["evaluator"]["extractor"],
             str(result["num_samples"])] + [format_value(c, m.get(c)) for c in TABLE_COLUMNS]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = ("| samples | extractor | N | IS | FID | sFID | Precision | Recall | Cond. acc. |\n"
                "|---|---|---|---|---|---|---|---|---|")
