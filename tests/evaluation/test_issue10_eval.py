"""The evaluation defects of issue 10: the reference cache key, the label of mixed statistics, and precision/recall
with the ADM evaluator's float16 distances (checked against a second computation that rounds to float16 in numpy)."""
import json

import numpy as np
import pytest
import torch

from evaluation.metrics import _squared_distances, precision_recall


def _images(seed, n=4, size=48):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _offset_stats(ref):
    """Precomputed statistics that differ from those of the file's images (as ADM's whole-dataset ones do)."""
    return {"mu": ref.pool_stats.mu + 1.0, "sigma": ref.pool_stats.sigma * 2.0,
            "mu_s": ref.spatial_stats.mu - 1.0, "sigma_s": ref.spatial_stats.sigma * 3.0}


def test_cache_key_includes_use_precomputed(random_inception_extractor, tmp_path):
    from evaluation.reference import reference_features

    ext = random_inception_extractor
    np.savez(tmp_path / "plain.npz", arr_0=_images(1))
    stats = _offset_stats(reference_features(str(tmp_path / "plain.npz"), ext, use_cache=False))
    ref = tmp_path / "adm.npz"
    np.savez(ref, arr_0=_images(1), **stats)
    images = reference_features(str(ref), ext, use_precomputed=False)  # writes its cache first
    assert images.info["source"] == "images"
    default = reference_features(str(ref), ext)  # must not be served the images-only cache
    assert default.info["source"] == "precomputed" and default.info["cache"] != images.info["cache"]
    np.testing.assert_array_equal(default.pool_stats.mu, stats["mu"])
    again = reference_features(str(ref), ext)  # its own cache, same answer
    assert again.info["cache"] == default.info["cache"] and again.info["source"] == "precomputed"
    np.testing.assert_array_equal(again.spatial_stats.sigma, stats["sigma_s"])


def test_pool_statistics_without_spatial_ones_are_labelled_honestly(random_inception_extractor, tmp_path):
    from evaluation.evaluate import evaluate_npz
    from evaluation.reference import reference_features

    ext = random_inception_extractor
    np.savez(tmp_path / "plain.npz", arr_0=_images(1))
    stats = _offset_stats(reference_features(str(tmp_path / "plain.npz"), ext, use_cache=False))
    np.savez(tmp_path / "half.npz", arr_0=_images(1), mu=stats["mu"], sigma=stats["sigma"])
    np.savez(tmp_path / "samples.npz", arr_0=_images(2))
    half = evaluate_npz(str(tmp_path / "half.npz"), str(tmp_path / "samples.npz"), "inception", extractor_obj=ext,
                        use_cache=False)
    info = half["reference"]
    assert (info["fid_source"], info["sfid_source"]) == ("precomputed", "images")
    assert info["source"] == "FID from precomputed statistics, sFID from images"
    plain = evaluate_npz(str(tmp_path / "plain.npz"), str(tmp_path / "samples.npz"), "inception", extractor_obj=ext,
                         use_cache=False)
    assert half["metrics"]["sFID"] == pytest.approx(plain["metrics"]["sFID"], rel=1e-9)  # from the images indeed
    assert half["metrics"]["FID"] != pytest.approx(plain["metrics"]["FID"], rel=1e-3)    # from mu/sigma indeed


# --------------------------------------------------------------------------------------- float16 distances
def _numpy_fp16_squared_distances(a, b):
    """Second computation of ADM's DistanceBlock: numpy float16 storage, each elementwise op rounded to float16."""
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is part of the semantics
        na = (a16.astype(np.float32) ** 2).sum(1).astype(np.float16)
        nb = (b16.astype(np.float32) ** 2).sum(1).astype(np.float16)
        prod = (a16.astype(np.float32) @ b16.astype(np.float32).T).astype(np.float16)
        d = (na[:, None] - np.float16(2) * prod) + nb[None, :]
    if not np.isfinite(d).all():  # ADM falls back to float32 for such a block
        d = ((a.astype(np.float32) ** 2).sum(1)[:, None] + (b.astype(np.float32) ** 2).sum(1)[None, :]
             - 2 * a.astype(np.float32) @ b.astype(np.float32).T)
    return np.maximum(d.astype(np.float32), 0)


def _numpy_pr(real, fake, k=3):
    def radii(x):
        return np.sort(_numpy_fp16_squared_distances(x, x), axis=1)[:, k]  # itself included, as ADM's partition

    def coverage(query, support):
        return float((_numpy_fp16_squared_distances(query, support) <= radii(support)[None, :]).any(1).mean())
    return coverage(fake, real), coverage(real, fake)


def _features(seed, n, dim=64):
    """Non-negative features on a 1/16 grid (like pooled ReLU features): every float32 sum in both computations is
    exact, so only the float16 roundings can differ, and they are the same in both."""
    return np.random.default_rng(seed).integers(0, 40, (n, dim)).astype(np.float32) / 16.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp16_precision_recall_matches_explicit_float16_rounding(seed):
    real, fake = _features(seed, 90), _features(seed + 100, 70) * 1.1
    ours = precision_recall(real, fake, k=3, row_batch=32, col_batch=40, distances="fp16")
    assert ours == _numpy_pr(real, fake)
    d16 = _squared_distances(torch.from_numpy(real), torch.from_numpy(fake), "fp16").numpy()
    np.testing.assert_array_equal(d16, _numpy_fp16_squared_distances(real, fake))
    d32 = _squared_distances(torch.from_numpy(real), torch.from_numpy(fake), "fp32").numpy()
    assert (d16 != d32).mean() > 0.5  # the semantics differ on most pairs: the test can tell them apart


def test_fp16_semantics_move_the_metrics():
    """Over a few draws, float16 rounding changes precision or recall (ties with a radius now count as inside)."""
    moved = 0
    for seed in range(6):
        real, fake = _features(seed, 90), _features(seed + 100, 70) * 1.1
        moved += precision_recall(real, fake, distances="fp16") != precision_recall(real, fake, distances="fp32")
    assert moved >= 1


def test_fp16_overflow_falls_back_to_fp32():
    real, fake = _features(3, 40) * 64, _features(4, 30) * 64  # squared norms beyond float16's 65504
    assert precision_recall(real, fake, distances="fp16") == precision_recall(real, fake, distances="fp32")
    assert precision_recall(real, fake, distances="fp16") == _numpy_pr(real, fake)


def test_distances_default_and_record(random_inception_extractor, tmp_path):
    from evaluation.evaluate import evaluate_npz, resolve_pr_distances

    assert resolve_pr_distances("auto", "inception", "VIRTUAL_imagenet256_labeled.npz") == "fp16"
    assert resolve_pr_distances("auto", "digits", "digits-train") == "fp32"
    assert resolve_pr_distances("fp32", "inception", "ref.npz") == "fp32"
    np.savez(tmp_path / "ref.npz", arr_0=_images(1))
    np.savez(tmp_path / "samples.npz", arr_0=_images(2))
    for choice, expected in (("auto", "fp16"), ("fp32", "fp32")):
        result = evaluate_npz(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "inception",
                              extractor_obj=random_inception_extractor, pr_distances=choice, use_cache=False)
        assert result["pr_distances"] == expected
        assert ("DistanceBlock" in result["pr_distances_rule"]) == (expected == "fp16")


def test_evaluate_script_records_the_choice(tmp_path):
    import importlib.util
    import os

    from ldm.data.digits import load_digits_split, to_uint8
    from ldm.util import cli_main

    x, y = load_digits_split("heldout")
    np.savez(tmp_path / "s.npz", arr_0=to_uint8(x[:40]), arr_1=y.numpy()[:40])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("evaluate_05", os.path.join(root, "quant_scripts/05_evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for flag, expected in ((None, "fp32"), ("fp16", "fp16")):
        out = tmp_path / f"{flag}.json"
        cli_main(module.main, ["digits-train", str(tmp_path / "s.npz"), "--extractor", "digits", "--out", str(out),
                               "--no-progress"] + ([f"--pr-distances={flag}"] if flag else []))
        assert json.loads(out.read_text())["pr_distances"] == expected
