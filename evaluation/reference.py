"""Reference batches: features of real images, computed once per extractor and cached beside the file.

A reference is an ADM `.npz` (`arr_0` images; the ADM batches also hold precomputed `mu`/`sigma` (pool) and
`mu_s`/`sigma_s` (spatial) of the whole data set, which are valid for the Inception extractor only), or for
the digits benchmark the literal `digits-train` / `digits-heldout` (the real split from ldm.data.digits).
"""
import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm import tqdm

from evaluation.metrics import FeatureStats
from evaluation.npz_io import check_image_array, file_sha256, iter_npz_batches, npz_keys, load_npz_array
from ldm.util import UserError, atomic_write_bytes

DIGITS_REFERENCES = {"digits-train": "train", "digits-heldout": "heldout"}
CACHE_VERSION = 2  # 2: the key says whether precomputed statistics were allowed; per-statistic sources


@dataclass
class ReferenceFeatures:
    pool_stats: FeatureStats
    spatial_stats: Optional[FeatureStats]
    pool: Optional[np.ndarray]  # per-image pool features for precision/recall (None: the file has no images)
    info: dict = field(default_factory=dict)


def extract_npz(path, extractor, key="arr_0", progress=False):
    """Features (dict of [N, D] float32 arrays) of all images in one array of an .npz, streamed in batches."""
    shape = check_image_array(path, key)
    parts = {}
    batches = iter_npz_batches(path, key, batch_size=getattr(extractor, "batch_size", 256))
    for batch in tqdm(batches, total=-(-shape[0] // getattr(extractor, "batch_size", 256)),
                      desc=f"features {os.path.basename(path)}", disable=not progress):
        for name, value in extractor(batch).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(v, axis=0) for name, v in parts.items()}


def extractor_cache_key(extractor):
    """Extractor name + hash of its weights: features from different weights never share a cache."""
    return f"{extractor.name}-{file_sha256(extractor.weights_path)[:12]}"


def _digits_reference(name, extractor):
    from ldm.data.digits import load_digits_split, to_uint8

    images, _ = load_digits_split(DIGITS_REFERENCES[name])
    feats = extractor(to_uint8(images))
    return ReferenceFeatures(FeatureStats.from_features(feats["pool"]), FeatureStats.from_features(feats["spatial"]),
                             feats["pool"], {"path": name, "source": "images", "fid_source": "images",
                                             "sfid_source": "images", "num_images": len(images)})


def _save_cache(path, ref: ReferenceFeatures):
    arrays = {"version": np.int64(CACHE_VERSION), "mu": ref.pool_stats.mu, "sigma": ref.pool_stats.sigma,
              "n": np.int64(ref.pool_stats.n), "source": np.array(ref.info["source"]),
              "fid_source": np.array(ref.info["fid_source"]), "sfid_source": np.array(ref.info["sfid_source"]),
              "num_images": np.int64(ref.info["num_images"])}
    if ref.pool_stats.factor is not None:
        arrays["factor"] = ref.pool_stats.factor
    if ref.spatial_stats is not None:
        arrays.update(mu_s=ref.spatial_stats.mu, sigma_s=ref.spatial_stats.sigma, n_s=np.int64(ref.spatial_stats.n))
        if ref.spatial_stats.factor is not None:
            arrays["factor_s"] = ref.spatial_stats.factor
    if ref.pool is not None:
        arrays["pool"] = ref.pool.astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as err:  # a read-only reference directory only costs recomputation next time
        warnings.warn(f"could not write the reference cache {path}: {err}")


def _load_cache(path, info):
    with np.load(path, allow_pickle=False) as d:
        if int(d["version"]) != CACHE_VERSION:
            return None
        opt = lambda key: d[key] if key in d.files else None  # noqa: E731
        spatial = FeatureStats(d["mu_s"], d["sigma_s"], int(d["n_s"]), opt("factor_s")) if "mu_s" in d.files else None
        info = dict(info, source=str(d["source"]), fid_source=str(d["fid_source"]), sfid_source=str(d["sfid_source"]),
                    num_images=int(d["num_images"]), cache=path)
        return ReferenceFeatures(FeatureStats(d["mu"], d["sigma"], int(d["n"]), opt("factor")), spatial,
                                 d["pool"] if "pool" in d.files else None, info)


def reference_features(ref, extractor, use_cache=True, use_precomputed=True, progress=False):
    """ReferenceFeatures of `ref` (an .npz path or a digits split literal) under `extractor`."""
    if ref in DIGITS_REFERENCES:
        return _digits_reference(ref, extractor)
    keys = npz_keys(ref)
    digest = file_sha256(ref)
    info = {"path": os.path.abspath(ref), "sha256": digest}
    # the key holds everything the statistics depend on: extractor weights, file content, and whether the
    # file's precomputed statistics may be used (a --no-precomputed run must not serve later default runs)
    mode = "precomputed-allowed" if use_precomputed else "images-only"
    cache_path = f"{ref}.{extractor_cache_key(extractor)}-{digest[:12]}-{mode}.cache.npz"
    if use_cache and os.path.isfile(cache_path):
        cached = _load_cache(cache_path, info)
        if cached is not None:
            return cached
    # ADM's precomputed statistics come from the TF Inception graph: meaningless for any other extractor
    precomputed = use_precomputed and extractor.name.startswith("inception") and {"mu", "sigma"} <= set(keys)
    if not precomputed and "arr_0" not in keys:
        raise UserError(f"reference {ref} has neither images (arr_0) nor usable precomputed statistics (mu, sigma)")
    feats = extract_npz(ref, extractor, progress=progress) if "arr_0" in keys else None
    if precomputed:
        pool_stats = FeatureStats(load_npz_array(ref, "mu").astype(np.float64),
                                  load_npz_array(ref, "sigma").astype(np.float64), 0)
        fid_source = "precomputed"
        if {"mu_s", "sigma_s"} <= set(keys):
            spatial_stats = FeatureStats(load_npz_array(ref, "mu_s").astype(np.float64),
                                         load_npz_array(ref, "sigma_s").astype(np.float64), 0)
            sfid_source = "precomputed"
        elif feats is not None:  # the file has no spatial statistics: sFID from its images, and the label says so
            spatial_stats, sfid_source = FeatureStats.from_features(feats["spatial"]), "images"
        else:
            spatial_stats, sfid_source = None, "none"
    else:
        pool_stats = FeatureStats.from_features(feats["pool"])
        spatial_stats = FeatureStats.from_features(feats["spatial"])
        fid_source = sfid_source = "images"
    source = fid_source if sfid_source in (fid_source, "none") else \
        f"FID from {fid_source} statistics, sFID from {sfid_source}"
    info.update(source=source, fid_source=fid_source, sfid_source=sfid_source,
                num_images=0 if feats is None else len(feats["pool"]))
    result = ReferenceFeatures(pool_stats, spatial_stats, None if feats is None else feats["pool"], info)
    if use_cache:
        _save_cache(cache_path, result)
        result.info["cache"] = cache_path
    return result
