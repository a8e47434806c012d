"""Sample-quality metrics, written once for any feature extractor.

Conventions follow the ADM evaluator (EVALUATION.md section 1): FID and sFID are Fréchet distances between
Gaussians fitted to features (np.cov, ddof=1); IS is the mean over contiguous splits; precision and recall are
the k-NN manifold estimates of Kynkäänniemi et al. (2019) with k = 3.
"""
import io
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.linalg
import torch

from ldm.util import atomic_write_bytes


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set: all that FID / sFID need.

    With fewer samples than dimensions the covariance has rank < D; then `factor` C ([n, D], sigma = C^T C)
    is kept as well, so that the Fréchet distance needs an n x n eigenproblem instead of a D x D sqrtm.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    factor: Optional[np.ndarray] = None

    @classmethod
    def from_features(cls, features):
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need features of shape [N>=2, D], got {feats.shape}")
        n, dim = feats.shape
        mu = feats.mean(axis=0)
        factor = (feats - mu) / np.sqrt(n - 1) if n <= dim else None
        return cls(mu=mu, sigma=np.cov(feats, rowvar=False).reshape(dim, dim), n=int(n), factor=factor)

    def frechet_distance(self, other: "FeatureStats") -> float:
        if self.factor is not None:
            return frechet_distance_lowrank(self.mu, self.factor, other.mu, other.sigma)
        if other.factor is not None:
            return frechet_distance_lowrank(other.mu, other.factor, self.mu, self.sigma)
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path):
        buf = io.BytesIO()
        extra = {} if self.factor is None else {"factor": self.factor}
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), **extra)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as data:
            factor = data["factor"].astype(np.float64) if "factor" in data.files else None
            return cls(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64), n=int(data["n"]),
                       factor=factor)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    sqrtm of a product of (near-)singular covariances can fail or come back with tiny imaginary parts from
    round-off; the former is retried with eps added to both diagonals, the latter is dropped (a large
    imaginary part means the result cannot be trusted and raises).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        warnings.warn(f"sqrtm of the covariance product is not finite; retrying with {eps} added to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_lowrank(mu1, factor1, mu2, sigma2) -> float:
    """The same distance when sigma1 = C^T C with C [n, D], n small.

    The non-zero eigenvalues of sigma1 sigma2 = C^T C sigma2 are those of the symmetric PSD n x n matrix
    C sigma2 C^T, so Tr (sigma1 sigma2)^(1/2) = sum of their square roots: exact for rank-deficient sigma1.
    """
    factor1, sigma2 = np.asarray(factor1, np.float64), np.asarray(sigma2, np.float64)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    inner = factor1 @ sigma2 @ factor1.T
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    # centred factors have a zero eigenvalue whose round-off (~1e-16) would add ~1e-8 per root; drop it
    eig[eig < max(eig.max(), 0.0) * 1e-12] = 0.0
    tr_covmean = np.sqrt(eig).sum()
    return float(diff @ diff + np.sum(factor1 * factor1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits_or_probs, split_size=5000, kind="logits"):
    """(mean, std) of exp(E_x KL(p(y|x) || p(y))) over contiguous splits of `split_size` rows.

    ADM convention: splits are taken in file order (so a class-major file gives a low IS, EVALUATION.md
    pitfall 1) and a shorter last split is kept. kind: "logits" (softmax applied) or "probs".
    """
    x = torch.as_tensor(np.asarray(logits_or_probs), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need [N, classes], got {tuple(x.shape)}")
    if kind == "logits":
        logp = torch.log_softmax(x, dim=1)
    elif kind == "probs":
        logp = torch.log(x)  # zeros give -inf; their terms are masked to 0 below
    else:
        raise ValueError(f"kind must be 'logits' or 'probs', got {kind!r}")
    p = logp.exp()
    scores = []
    for start in range(0, x.shape[0], int(split_size)):
        p_part, logp_part = p[start:start + split_size], logp[start:start + split_size]
        log_marginal = torch.log(p_part.mean(dim=0, keepdim=True))
        terms = torch.where(p_part > 0, p_part * (logp_part - log_marginal), torch.zeros_like(p_part))
        scores.append(math.exp(terms.sum(dim=1).mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


PR_DISTANCES = ("fp32", "fp16")


def _half(x):
    """Round to float16 (nearest even) and back: float16 storage of a float32 result."""
    return x.to(torch.float16).to(torch.float32)


def _fp16_squared_distances(a, b):
    """The ADM evaluator's DistanceBlock semantics: features cast to float16, then ||a||^2 - 2ab + ||b||^2 with
    every intermediate stored in float16 (sums and products accumulated in float32, as GPU float16 kernels do),
    clamped at 0. Returns float32 holding float16 values (inf where float16 overflows)."""
    a16, b16 = _half(a), _half(b)
    na, nb = _half((a16 * a16).sum(1)), _half((b16 * b16).sum(1))
    prod = _half(a16 @ b16.T)
    return _half(_half(na[:, None] - 2.0 * prod) + nb[None, :]).clamp_min_(0.0)


def _squared_distances(a, b, distances="fp32"):
    """Pairwise squared distances of one block. "fp16": ADM's float16 block, falling back to float32 for a block
    with a non-finite entry (as its DistanceBlock does); "fp32": ||a||^2 + ||b||^2 - 2ab in float32, clamped
    (round-off may give tiny negatives)."""
    if distances == "fp16":
        d = _fp16_squared_distances(a, b)
        if bool(torch.isfinite(d).all()):
            return d
    elif distances != "fp32":
        raise ValueError(f"distances must be one of {PR_DISTANCES}, got {distances!r}")
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def knn_radii(features, k=3, row_batch=1024, col_batch=10000, distances="fp32"):
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    feats = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    n = feats.shape[0]
    if n < k + 1:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    radii = torch.empty(n)
    for r0 in range(0, n, row_batch):
        rows = feats[r0:r0 + row_batch]
        best = None  # running k+1 smallest distances (the point itself counts as one at distance 0)
        for c0 in range(0, n, col_batch):
            d = _squared_distances(rows, feats[c0:c0 + col_batch], distances)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + row_batch] = best[:, k]
    return radii


def manifold_coverage(query, support, support_radii, row_batch=1024, col_batch=10000, distances="fp32"):
    """Boolean [Nq]: does each query point lie inside at least one k-NN ball of the support set?"""
    q = torch.as_tensor(np.asarray(query), dtype=torch.float32)
    s = torch.as_tensor(np.asarray(support), dtype=torch.float32)
    radii = torch.as_tensor(support_radii, dtype=torch.float32)
    inside = torch.zeros(q.shape[0], dtype=torch.bool)
    for r0 in range(0, q.shape[0], row_batch):
        rows = q[r0:r0 + row_batch]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool)
        for c0 in range(0, s.shape[0], col_batch):
            d = _squared_distances(rows, s[c0:c0 + col_batch], distances)
            hit |= (d <= radii[None, c0:c0 + col_batch]).any(dim=1)
        inside[r0:r0 + row_batch] = hit
    return inside


def precision_recall(real_features, fake_features, k=3, row_batch=1024, col_batch=10000, distances="fp32"):
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold).

    distances: "fp32", or "fp16" for the ADM evaluator's float16 distance blocks (its published numbers use
    them; the rounding ties many distances with a radius, which moves recall by a few tenths of a point on
    Inception features)."""
    real_radii = knn_radii(real_features, k, row_batch, col_batch, distances)
    fake_radii = knn_radii(fake_features, k, row_batch, col_batch, distances)
    precision = manifold_coverage(fake_features, real_features, real_radii, row_batch, col_batch, distances)
    recall = manifold_coverage(real_features, fake_features, fake_radii, row_batch, col_batch, distances)
    return float(precision.double().mean()), float(recall.double().mean())


def conditional_accuracy(pred_labels, target_labels) -> float:
    """Fraction of samples whose predicted class equals the class they were generated for."""
    pred, target = np.asarray(pred_labels).reshape(-1), np.asarray(target_labels).reshape(-1)
    if pred.shape != target.shape or pred.size == 0:
        raise ValueError(f"label arrays must be non-empty and equal in length, got {pred.shape} and {target.shape}")
    return float(np.mean(pred == target))


def psnr(a_uint8, b_uint8) -> float:
    """Mean over images of 10 log10(255^2 / MSE) for uint8 images [N,H,W,C] (or one [H,W,C]).

    An identical pair has infinite PSNR, so the mean is then inf.
    """
    a, b = np.asarray(a_uint8), np.asarray(b_uint8)
    if a.shape != b.shape:
        raise ValueError(f"image arrays differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = (diff ** 2).reshape(diff.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        per_image = 10.0 * np.log10(255.0 ** 2 / mse)
    return float(np.mean(per_image))
