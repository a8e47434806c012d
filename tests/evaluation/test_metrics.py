"""Metrics against closed forms, hand-computed answers and second computations."""
import math

import numpy as np
import pytest

from evaluation.metrics import (FeatureStats, conditional_accuracy, frechet_distance, frechet_distance_lowrank,
                                inception_score, knn_radii, manifold_coverage, precision_recall, psnr)


def _eigen_frechet(mu1, s1, mu2, s2):
    # independent route: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all symmetric eigenproblems
    e, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(e, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    d1, d2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariances_match_eigen_computation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_eigen_frechet(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_singular_covariances_and_lowrank_path():
    # 5 samples in 12 dims: both covariances have rank 4 (the few-samples case)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 12)), rng.normal(size=(5, 12)) + 0.5
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    assert sx.factor is not None and np.allclose(sx.factor.T @ sx.factor, np.cov(x, rowvar=False))
    expected = _eigen_frechet(sx.mu, sx.sigma, sy.mu, sy.sigma)
    assert frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) == pytest.approx(expected, rel=1e-5)
    assert sx.frechet_distance(sy) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance_lowrank(sy.mu, sy.factor, sx.mu, sx.sigma) == pytest.approx(expected, rel=1e-8)
    assert sx.frechet_distance(sx) == pytest.approx(0.0, abs=1e-8)


def test_feature_stats_roundtrip(tmp_path):
    feats = np.random.default_rng(3).normal(size=(50, 4))
    stats = FeatureStats.from_features(feats)
    assert np.allclose(stats.sigma, np.cov(feats, rowvar=False)) and stats.factor is None
    stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 50 and np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)


def test_inception_score_closed_forms():
    one_hot = np.eye(10)[np.arange(40) % 10]  # uniform marginal over 10 classes
    assert inception_score(one_hot, kind="probs")[0] == pytest.approx(10.0)
    assert inception_score(60.0 * one_hot)[0] == pytest.approx(10.0, rel=1e-6)  # as logits
    assert inception_score(np.zeros((40, 10)))[0] == pytest.approx(1.0)  # uniform predictions
    # two balanced classes with p(y|x) = (3/4, 1/4): IS = exp(log 2 - H(3/4, 1/4))
    p = np.array([[0.75, 0.25], [0.25, 0.75]] * 5)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert inception_score(p, kind="probs")[0] == pytest.approx(math.exp(math.log(2) - h))


def test_inception_score_contiguous_splits():
    # EVALUATION.md pitfall 1: a class-major file only has a few classes per split
    class_major = np.eye(4)[[0, 0, 1, 1, 2, 2, 3, 3]]
    shuffled = np.eye(4)[[0, 1, 2, 3, 3, 2, 1, 0]]
    assert inception_score(class_major, split_size=4, kind="probs") == pytest.approx((2.0, 0.0))
    assert inception_score(shuffled, split_size=4, kind="probs") == pytest.approx((4.0, 0.0))
    # a shorter last split is kept: splits {0,1,2,3}, {0,1} -> mean(4, 2) = 3, std 1
    assert inception_score(np.eye(4)[[0, 1, 2, 3, 0, 1]], split_size=4, kind="probs") == pytest.approx((3.0, 1.0))


def test_precision_recall_hand_computed():
    # k = 3 in 1-D. Real {0,1,2,3}: radii 3,2,2,3 -> union of balls [-3, 6].
    # Fake {3.2,5,5.5,5.8,20}: radii 2.6,1.8,2.3,2.6,15 -> union [0.6, 35].
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[3.2], [5.0], [5.5], [5.8], [20.0]])
    assert np.allclose(knn_radii(real, 3).numpy(), np.array([3, 2, 2, 3]) ** 2)
    assert np.allclose(knn_radii(fake, 3).numpy(), np.array([2.6, 1.8, 2.3, 2.6, 15.0]) ** 2, rtol=1e-5)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == pytest.approx(4 / 5)  # 20 lies outside the real manifold
    assert recall == pytest.approx(3 / 4)  # 0 lies outside the fake manifold


def test_precision_recall_batched_matches_brute_force():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(37, 5)), rng.normal(size=(29, 5)) + 0.3

    def brute(support, query, k=3):
        d_ss = ((support[:, None] - support[None]) ** 2).sum(-1)
        radii = np.sort(d_ss, axis=1)[:, k]
        d_qs = ((query[:, None] - support[None]) ** 2).sum(-1)
        return (d_qs <= radii[None]).any(axis=1).mean()

    small = dict(row_batch=4, col_batch=7)
    assert precision_recall(real, fake, **small) == pytest.approx((brute(real, fake), brute(fake, real)), abs=1e-12)
    cov = manifold_coverage(fake, real, knn_radii(real, 3, **small), **small)
    assert cov.double().mean().item() == pytest.approx(brute(real, fake))


def test_conditional_accuracy():
    assert conditional_accuracy([0, 1, 2, 3], [0, 1, 0, 3]) == 0.75
    with pytest.raises(ValueError):
        conditional_accuracy([0, 1], [0])


def test_psnr_closed_form():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] = 10  # MSE 100
    b[1] = 1  # MSE 1
    expected = np.mean([10 * np.log10(255 ** 2 / 100), 10 * np.log10(255 ** 2 / 1)])
    assert psnr(a, b) == pytest.approx(expected)
    assert psnr(a[0], b[0]) == pytest.approx(10 * np.log10(650.25))
    assert psnr(a, a) == math.inf
