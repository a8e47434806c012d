"""InceptionV3 plumbing with random weights: shapes, the sFID hook, the weights-file error, evaluate_npz."""
import json
import os

import numpy as np
import pytest
import torch

from evaluation.inception import SPATIAL_DIM, WEIGHTS_FILENAME, WEIGHTS_URL, InceptionExtractor
from ldm.util import UserError


def _images(seed, n=4, size=48):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_missing_weights_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("MPQDM_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(UserError) as err:
        InceptionExtractor()
    msg = str(err.value)
    assert WEIGHTS_FILENAME in msg and WEIGHTS_URL in msg and "MPQDM_INCEPTION_WEIGHTS" in msg
    assert "\n" not in msg and ". " not in msg
    monkeypatch.delenv("MPQDM_INCEPTION_WEIGHTS")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match="hub"):
        InceptionExtractor()


def test_features_shapes_and_spatial_hook(random_inception_extractor):
    ext = random_inception_extractor
    images = _images(0, n=4)
    feats = ext(images)
    assert feats["pool"].shape == (4, 2048) and feats["logits"].shape == (4, 1008)
    assert feats["spatial"].shape == (4, SPATIAL_DIM) == (4, 2023)
    assert all(np.isfinite(v).all() for v in feats.values())
    assert feats["pool"].std(axis=0).mean() > 1e-3  # random weights still separate images

    # second route to mixed_6/conv: the first 192 channels of Mixed_6d's concatenated output are branch1x1
    seen = []
    handle = ext.net.Mixed_6d.register_forward_hook(lambda m, i, o: seen.append(o[:, :7].permute(0, 2, 3, 1)))
    with torch.no_grad():
        pool, logits = ext.net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    handle.remove()
    assert np.allclose(seen[0].reshape(4, -1).numpy(), feats["spatial"], atol=1e-5)
    # logits_unbiased = pool_3 @ W^T (the ADM evaluator's softmax input, no bias)
    assert np.allclose(feats["logits"], feats["pool"] @ ext.net.fc.weight.numpy().T, rtol=1e-4, atol=1e-5)
    assert np.allclose(pool.numpy(), feats["pool"], atol=1e-5)


def test_evaluate_npz_inception_plumbing(random_inception_extractor, tmp_path):
    from evaluation.evaluate import evaluate_npz
    from evaluation.reference import reference_features

    ref_images, sample_images = _images(1), _images(2)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    np.savez(tmp_path / "samples.npz", arr_0=sample_images, meta=np.array(json.dumps({"steps": 20})))
    ext = random_inception_extractor
    first = evaluate_npz(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "inception", extractor_obj=ext)
    m = first["metrics"]
    assert first["num_samples"] == 4 and first["is_split_size"] == 5000 and first["settings"] == {"steps": 20}
    assert m["FID"] > 0 and m["sFID"] > 0 and 1.0 <= m["IS"] <= 4.0
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0 and "conditional_accuracy" not in m
    assert first["reference"]["source"] == "images" and os.path.isfile(first["reference"]["cache"])

    cached = reference_features(str(tmp_path / "ref.npz"), ext)
    assert cached.info["cache"] == first["reference"]["cache"] and cached.pool.shape == (4, 2048)
    assert cached.spatial_stats.mu.shape == (2023,)

    same = evaluate_npz(str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), "inception", extractor_obj=ext)
    assert same["metrics"]["FID"] == pytest.approx(0, abs=1e-3) and same["metrics"]["sFID"] == pytest.approx(0, abs=1e-3)
    assert same["metrics"]["precision"] == 1.0 and same["metrics"]["recall"] == 1.0

    # an ADM-style batch with precomputed statistics only: FID / sFID as before, no precision / recall
    pool, spatial = cached.pool_stats, cached.spatial_stats
    np.savez(tmp_path / "stats.npz", mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    pre = evaluate_npz(str(tmp_path / "stats.npz"), str(tmp_path / "samples.npz"), "inception", extractor_obj=ext)
    assert pre["reference"]["source"] == "precomputed" and pre["metrics"]["precision"] is None
    assert pre["metrics"]["FID"] == pytest.approx(m["FID"], rel=1e-4)
    assert pre["metrics"]["sFID"] == pytest.approx(m["sFID"], rel=1e-4)
