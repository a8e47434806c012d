"""Pipeline artifacts: one file ``{"meta": {...plain types...}, <name>: tensors...}`` per stage.

``meta`` records what a later stage must agree with (model config hash, preset, method + options, bits, sampler
timesteps, seeds, OMQ choices, TRD mode, toolkit version). Files are written atomically and loaded with
``weights_only=True`` (tensors and plain containers only; nothing in a file is executed).
"""
import hashlib
import json
import os

import torch

from ldm.util import UserError, atomic_save

ARTIFACT_FORMAT = 1


def toolkit_version() -> str:
    """Version of the installed toolkit, else the one in the source tree's pyproject.toml."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("mpqdm-toolkit")
        except PackageNotFoundError:
            pass
        import tomllib
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "pyproject.toml"), "rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])
    except Exception:  # version is informational; never fail a run over it
        return "unknown"


def plain(value):
    """Meta values as JSON-like plain types (tuples -> lists, numpy/tensor scalars -> python)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return plain(value.tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return plain(value.tolist())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"meta value of type {type(value).__name__} is not a plain type")


def config_hash(config) -> str:
    """sha256 of a model config (OmegaConf or mapping) in canonical JSON, first 16 hex digits."""
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(config):
            config = OmegaConf.to_container(config, resolve=True)
    except ImportError:
        pass
    text = json.dumps(plain(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def save_artifact(path, meta: dict, **payload):
    """Write ``{"meta": meta + format/version, **payload}`` atomically; returns the path."""
    full_meta = {"format": ARTIFACT_FORMAT, "toolkit_version": toolkit_version()}
    full_meta.update(plain(meta))
    atomic_save({"meta": full_meta, **payload}, path)
    return path


def load_artifact(path, what: str = "artifact", made_by: str = None) -> dict:
    """Load an artifact with weights_only=True; a missing or unreadable file is a UserError."""
    path = os.fspath(path)
    hint = f"; run {made_by} first" if made_by else ""
    if not os.path.isfile(path):
        raise UserError(f"The {what} {path} does not exist{hint}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated/corrupt or not a torch file
        raise UserError(f"The {what} {path} could not be read ({type(err).__name__}){hint}.") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("meta"), dict):
        raise UserError(f"The {what} {path} has no meta record, so it was not written by this toolkit{hint}.")
    return obj


def _same(a, b) -> bool:
    a, b = plain(a), plain(b)
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
        except (TypeError, ValueError):
            return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _show(value, limit: int = 80) -> str:
    text = repr(plain(value))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_meta(meta: dict, expected: dict, what: str = "artifact",
               hint: str = "re-run the stage that makes it with matching settings"):
    """Raise UserError naming the first field whose value differs from ``expected`` (None = must be absent)."""
    for field, want in expected.items():
        have = meta.get(field)
        if not _same(have, want):
            raise UserError(f"The {what} has {field}={_show(have)} but {_show(want)} is expected; {hint}.")
