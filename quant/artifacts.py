"""Pipeline artifacts: one file ``{"meta": {...plain types...}, <name>: tensors...}`` per stage.

``meta`` records what a later stage must agree with (model config hash, preset, method + options, bits, sampler
timesteps, seeds, OMQ choices, TRD mode, toolkit version) and, since format 2:
- ``checksum``: sha256 over the meta without this field (canonical JSON) and the payload tensors (name, dtype,
  shape and bytes, in sorted name order), verified on load, so flipped bytes are refused instead of trained on;
- ``parent``: {stage: checksum} of the artifacts it was made from, so that a downstream artifact whose upstream
  file was re-made since (e.g. a W2A4 finetuned.pt next to a new W4A8 naive.pt) is refused.
Files are written atomically and loaded with ``weights_only=True`` (tensors and plain containers only; nothing in a
file is executed).
"""
import hashlib
import json
import os

import torch

from ldm.util import UserError, atomic_save, write_error

ARTIFACT_FORMAT = 2  # 2: checksum + parent identity in meta


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


# ------------------------------------------------------------------------------------------------ checksums
def _leaves(value, prefix=""):
    """(dotted name, leaf) of a payload in sorted name order (dicts nest; lists/tuples index)."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{prefix}{key}.")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{prefix}{i}.")
    else:
        yield prefix[:-1], value


def _tensor_bytes(t):
    """The tensor's bytes as a buffer (no copy for contiguous CPU tensors)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def content_checksum(meta: dict, payload: dict) -> str:
    """sha256 over the meta (without ``checksum``, canonical JSON) and every payload tensor's name, dtype, shape and
    bytes in sorted name order (non-tensor leaves by their JSON)."""
    h = hashlib.sha256()
    head = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8"))
    for name, leaf in _leaves(payload):
        if isinstance(leaf, torch.Tensor):
            h.update(f"\n{name} {leaf.dtype} {tuple(leaf.shape)}\n".encode("utf-8"))
            h.update(_tensor_bytes(leaf))
        else:
            h.update(f"\n{name} = {json.dumps(plain(leaf), sort_keys=True)}\n".encode("utf-8"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ save / load
def save_artifact(path, meta: dict, parent: dict = None, **payload):
    """Write ``{"meta": meta + format/version/parent/checksum, **payload}`` atomically; returns the path.

    parent: {stage: checksum} of the artifacts this one was made from. An OSError while writing (disk full,
    read-only or forbidden directory) is a UserError naming the path; the previous file, if any, is left intact.
    """
    full_meta = {"format": ARTIFACT_FORMAT, "toolkit_version": toolkit_version()}
    full_meta.update(plain({k: v for k, v in meta.items() if k not in ("checksum", "parent", "format")}))
    full_meta["parent"] = plain(dict(parent or {}))
    full_meta["checksum"] = content_checksum(full_meta, payload)
    try:
        atomic_save({"meta": full_meta, **payload}, path)
    except OSError as err:
        raise write_error(path, err) from None
    return path


def _hint(made_by):
    return f"re-run {made_by}" if made_by else "re-make it"


def load_artifact(path, what: str = "artifact", made_by: str = None, stage: str = None,
                  required: tuple = (), verify: bool = True) -> dict:
    """Load an artifact with weights_only=True and check it; every defect is a UserError of one sentence.

    stage: the ``meta["stage"]`` it must have; required: payload entries it must hold; verify: recompute the
    checksum (off only for callers that read the meta alone). made_by names the step that makes it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"The {what} {path} does not exist; run {made_by} first." if made_by
                        else f"The {what} {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated/corrupt or not a torch file
        raise UserError(f"The {what} {path} could not be read ({type(err).__name__}: it is truncated or not an "
                        f"artifact); {_hint(made_by)}.") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("meta"), dict):
        raise UserError(f"The {what} {path} has no meta record, so it was not written by this toolkit; "
                        f"{_hint(made_by)}.")
    meta = obj["meta"]
    if meta.get("format") != ARTIFACT_FORMAT or not isinstance(meta.get("checksum"), str):
        raise UserError(f"The {what} {path} was made by an older toolkit (artifact format {meta.get('format')}, "
                        f"this one reads {ARTIFACT_FORMAT}); {_hint(made_by)}.")
    if stage is not None and meta.get("stage") != stage:
        raise UserError(f"{path} is a {meta.get('stage')!r} artifact, not the {stage!r} one expected here; pass "
                        f"the right run_dir or {_hint(made_by)}.")
    if verify:
        payload = {k: v for k, v in obj.items() if k != "meta"}
        if content_checksum(meta, payload) != meta["checksum"]:
            raise UserError(f"The {what} {path} is corrupt (checksum mismatch); {_hint(made_by)}.")
    for name in required:
        if name not in obj:
            raise UserError(f"The {what} {path} holds no {name!r}; {_hint(made_by)}.")
    return obj


def read_artifact_checksum(path):
    """The recorded checksum of an artifact, read without loading its tensors (None if absent or unreadable)."""
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    meta = obj.get("meta") if isinstance(obj, dict) else None
    return meta.get("checksum") if isinstance(meta, dict) else None


def check_parents(meta: dict, upstream: dict, what: str, made_by: str = None):
    """Refuse an artifact made from another upstream file than the current one.

    upstream: {stage: path of the current upstream file}; a stage whose file is absent is not checked.
    """
    for stage, sha in (meta.get("parent") or {}).items():
        path = upstream.get(stage)
        if path is None or not os.path.isfile(path):
            continue
        current = read_artifact_checksum(path)
        if current != sha:
            raise UserError(f"The {what} was made from another {os.path.basename(path)} than the one in "
                            f"{os.path.dirname(os.path.abspath(path))} (re-made since), so it is stale; "
                            f"{_hint(made_by)}.")


def load_state_dict_checked(module, state_dict, what: str, made_by: str = None):
    """module.load_state_dict(state_dict) with key and shape mismatches as one sentence."""
    if not isinstance(state_dict, dict):
        raise UserError(f"The {what} holds a {type(state_dict).__name__} where a state dict is expected; "
                        f"{_hint(made_by)}.")
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and (not torch.is_tensor(state_dict[k])
                                                    or tuple(state_dict[k].shape) != tuple(own[k].shape))]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            shape = tuple(state_dict[k].shape) if torch.is_tensor(state_dict[k]) else type(state_dict[k]).__name__
            detail = f"tensor {k} has shape {shape}, the model needs {tuple(own[k].shape)}"
        elif missing:
            detail = f"{len(missing)} tensors are missing, e.g. {missing[0]}"
        else:
            detail = f"{len(unexpected)} tensors are not in the model, e.g. {unexpected[0]}"
        raise UserError(f"The {what} does not fit the model ({detail}); {_hint(made_by)}.")
    module.load_state_dict(state_dict)
    return module


# ------------------------------------------------------------------------------------------------ meta checks
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
