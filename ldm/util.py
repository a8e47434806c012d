"""Shared utilities: config instantiation, safe checkpoint I/O, user-facing errors."""
import collections
import contextvars
import errno
import importlib
import os
import pickle
import sys
import tempfile
import time
import types
from pathlib import Path

import torch


class UserError(Exception):
    """An error the user can fix (bad path, wrong preset, mismatched artifact): reported as one sentence."""


# errors of the environment a user fixes (disk full, read-only or forbidden location), not bugs of the toolkit
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC)}


def cli_main(fn, *args, **kwargs):
    """Run a script's main; a UserError (or a full / read-only / forbidden location) becomes one sentence on
    stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {write_error(err.filename or 'a file', err)}", file=sys.stderr)
        sys.exit(2)


TMP_PREFIX = ".tmp-"  # every temporary file the toolkit writes starts with this (see remove_stale_tmp_files)
_PROCESS_START = time.time()  # approximately this process's start: older temporary files belong to earlier runs
STALE_MARGIN_S = 60.0  # ...by this much, so that a concurrent writer's file between its last write and rename stays


def _publish(tmp, path):
    """Give the temporary file the permissions a plain open() would (mkstemp makes it 0600), then rename."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _write_atomically(path, write):
    """Run write(binary file handle) into a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The fsync comes before the rename, so after a crash ``path`` holds either the old or the complete new content.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes):
    """Write bytes so that readers never see a partial file (temporary file in the same dir, then rename)."""
    return _write_atomically(path, lambda fh: fh.write(data))


def atomic_save(obj, path):
    """torch.save that never leaves a truncated file behind."""
    return _write_atomically(path, lambda fh: torch.save(obj, fh))


def remove_stale_tmp_files(directory):
    """Delete the toolkit's temporary files (``.tmp-*``) in ``directory`` last modified before this process
    started (minus STALE_MARGIN_S): the leftovers of a run that was killed mid-write. Returns the removed paths;
    an unreadable directory is skipped."""
    removed, cutoff = [], _PROCESS_START - STALE_MARGIN_S
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        try:
            if (entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:  # raced with another process, or not ours to delete: leave it
            continue
    return removed


def ensure_writable_dir(directory, what="directory", clean=True):
    """Create ``directory`` if needed and prove that a file can be written there (before any work is done);
    clean: also remove stale temporary files of a killed run there."""
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix="probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"the {what} {directory} is not writable ({err.strerror or type(err).__name__}); "
                        "choose another one or fix its permissions") from None
    remove_stale_tmp_files(directory)
    return directory


def write_error(path, err):
    """The one-sentence UserError for an OSError while writing ``path`` (disk full, read-only, permissions)."""
    reason = err.strerror or type(err).__name__
    return UserError(f"could not write {os.fspath(path)} ({reason}); free space or choose a writable location "
                     "and re-run the same command")


# ------------------------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------------------------

def resolve_device(requested=None, activate=True):
    """The torch.device a script should use, with an explicit index for CUDA; anything unusable is a UserError.

    None or "" -> cuda:LOCAL_RANK when CUDA is available (torchrun), else cpu; "cuda" -> the current CUDA device;
    "cuda:N" -> checked against the device count; "cpu"; "mps" when available. activate=True makes a CUDA
    device the current one (torch.cuda.set_device needs the explicit index this function supplies).
    """
    if isinstance(requested, torch.device):
        requested = str(requested)
    if requested is None or str(requested).strip() == "":
        if torch.cuda.is_available():
            device = _cuda_device(int(os.environ.get("LOCAL_RANK", "0") or 0), "LOCAL_RANK")
        else:
            device = torch.device("cpu")
    else:
        text = str(requested).strip()
        kind, _, index = text.partition(":")
        if kind == "cpu" and index in ("", "0"):
            device = torch.device("cpu")
        elif kind == "mps" and index in ("", "0"):
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise UserError(f"device {text!r} was requested but MPS is not available here; use --device cpu")
            device = torch.device("mps")
        elif kind == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"device {text!r} was requested but CUDA is not available here; use --device cpu")
            if index == "":
                device = torch.device("cuda", torch.cuda.current_device())
            elif index.isdigit():
                device = _cuda_device(int(index), f"--device {text}")
            else:
                raise UserError(f"device {text!r} is not a device name; use cuda, cuda:N, cpu or mps")
        else:
            raise UserError(f"device {text!r} is not supported; use cuda, cuda:N, cpu or mps")
    if activate and device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _cuda_device(index, source):
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise UserError(f"{source} asks for CUDA device {index}, but this machine has {count} "
                        f"(cuda:0 to cuda:{count - 1}); choose one of them")
    return torch.device("cuda", index)


def default_device(requested=None):
    """Alias of resolve_device (kept for older callers)."""
    return resolve_device(requested)


# ------------------------------------------------------------------------------------------------------------------
# Configs: data, not code
# ------------------------------------------------------------------------------------------------------------------
# A config's `target:` is imported and called. By default only the toolkit's own packages and torch may be named;
# anything else (e.g. `os.system`) needs the user's explicit opt-in, --trust_config in the scripts.
TRUSTED_TARGET_ROOTS = ("ldm", "quant", "evaluation", "ddim", "torch")
_trust_targets = contextvars.ContextVar("trust_config_targets", default=False)


def get_obj_from_str(string, reload=False):
    module, cls = string.rsplit(".", 1)
    mod = importlib.import_module(module)
    if reload:
        mod = importlib.reload(mod)
    return getattr(mod, cls)


def _targets(config):
    """Every `target` value in a nested config (mappings and lists, OmegaConf or plain)."""
    if hasattr(config, "items"):
        for key, value in config.items():
            if key == "target":
                yield value
            else:
                yield from _targets(value)
    elif isinstance(config, (list, tuple)) or type(config).__name__ == "ListConfig":
        for value in config:
            yield from _targets(value)


def check_config_targets(config, trust_config=False):
    """Refuse a config naming a target outside the toolkit's packages and torch, unless trust_config."""
    if trust_config or _trust_targets.get():
        return
    for target in _targets(config):
        root = str(target).split(".")[0]
        if not isinstance(target, str) or root not in TRUSTED_TARGET_ROOTS:
            raise UserError(f"the config names target {target!r}, which is outside the toolkit's packages "
                            f"({', '.join(TRUSTED_TARGET_ROOTS)}) and would run its code; pass --trust_config "
                            "if you trust this config")


def instantiate_from_config(config, trust_config=False):
    """Build `target(**params)` from a {target, params} mapping, as the CompVis configs expect.

    Every target in the config tree is checked first (check_config_targets); trust_config=True allows any target,
    also for the sub-configs the built modules instantiate themselves.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    check_config_targets(config, trust_config)
    token = _trust_targets.set(True) if trust_config else None
    try:
        return get_obj_from_str(config["target"])(**config.get("params", dict()))
    finally:
        if token is not None:
            _trust_targets.reset(token)


# ------------------------------------------------------------------------------------------------------------------
# Safe checkpoint loading
# ------------------------------------------------------------------------------------------------------------------
# Official LDM/SD checkpoints are Lightning containers whose pickle references pytorch_lightning classes, so
# weights_only=True refuses them. The restricted unpickler below resolves only tensor-rebuild functions, plain
# containers and dtypes; Lightning classes become inert placeholders; everything else is refused.

_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): None,
    ("torch._utils", "_rebuild_tensor_v2"): None,
    ("torch._utils", "_rebuild_tensor_v3"): None,
    ("torch._utils", "_rebuild_parameter"): None,
    ("torch._utils", "_rebuild_parameter_with_state"): None,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): None,
    ("torch._tensor", "_rebuild_from_type_v2"): None,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
}
# numpy scalars/arrays (e.g. in Lightning callback state) rebuild from a dtype and raw bytes: data only.
_NUMPY_DATA_NAMES = {"scalar", "_reconstruct", "ndarray", "dtype"}
_PLACEHOLDER_ROOTS = ("pytorch_lightning", "lightning", "lightning_fabric")


class LightningPlaceholder:
    """Inert stand-in for a pickled Lightning class; instances just keep the state they were given."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        self._state = state

    def __repr__(self):
        return f"<placeholder for {self._qualified_name}>"


_placeholders = {}


def _placeholder_class(module, name):
    key = f"{module}.{name}"
    if key not in _placeholders:
        _placeholders[key] = type(name, (LightningPlaceholder,), {"_qualified_name": key, "__module__": __name__})
    return _placeholders[key]


def _safe_reconstructor(cls, base, state):
    # copyreg._reconstructor, restricted to placeholder classes built on object
    if not (isinstance(cls, type) and issubclass(cls, LightningPlaceholder)) or base is not object:
        raise UserError(f"refusing to rebuild {cls!r} from a checkpoint pickle")
    return cls.__new__(cls)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        key = (module, name)
        if key in _SAFE_GLOBALS:
            obj = _SAFE_GLOBALS[key]
            return obj if obj is not None else getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "_codecs" and name == "encode":  # protocol-2 bytes: encode(str, 'latin1')
            import _codecs
            return _codecs.encode
        if module == "copyreg" and name == "_reconstructor":
            return _safe_reconstructor
        if module == "builtins" and name == "object":
            return object
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy") and name in _NUMPY_DATA_NAMES:
            import numpy
            return getattr(numpy, name) if name in ("ndarray", "dtype") else getattr(
                importlib.import_module(module), name)
        if module.split(".")[0] in _PLACEHOLDER_ROOTS:
            return _placeholder_class(module, name)
        raise UserError(f"refusing to load checkpoint: its pickle references {module}.{name}, which is not "
                        "tensor data (loading it could run code)")


_restricted_pickle = types.ModuleType("ldm_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda fh, **kw: _RestrictedUnpickler(fh, **kw).load()
_restricted_pickle.__name__ = "ldm_restricted_pickle"

# checkpoint folder (where scripts/download_models.sh puts model.ckpt) -> the script's model name
DOWNLOAD_NAMES = {"cin256-v2": "cin256-v2", "lsun_beds256": "lsun_bedrooms", "lsun_churches256": "lsun_churches",
                  "celeba256": "celebahq", "ffhq256": "ffhq", "stable-diffusion-v1": "sd-v1-4"}
_GENERIC_CKPT_NAMES = {"model.ckpt", "model.safetensors", "last.ckpt"}


def download_name_for(path):
    """Name to pass to scripts/download_models.sh for a checkpoint path (its folder for model.ckpt files)."""
    p = Path(path)
    if p.name in _GENERIC_CKPT_NAMES and p.parent.name:
        return DOWNLOAD_NAMES.get(p.parent.name, p.parent.name)
    return DOWNLOAD_NAMES.get(p.stem, p.stem)


def _require_file(path, download_name=None):
    if not os.path.isfile(path):
        name = download_name or download_name_for(path)
        raise UserError(f"checkpoint {os.fspath(path)} not found; download it with "
                        f"`bash scripts/download_models.sh {name}`")


def load_checkpoint(path, download_name=None):
    """Load a checkpoint container without executing pickled code.

    Returns a dict with at least "state_dict" (Lightning containers keep their other entries, e.g.
    global_step; Lightning classes inside are LightningPlaceholder instances). Bare state dicts and
    .safetensors files are wrapped as {"state_dict": ...}.
    """
    path = os.fspath(path)
    _require_file(path, download_name)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return {"state_dict": collections.OrderedDict(load_file(path, device="cpu"))}
        except Exception as err:  # SafetensorError / OSError / ValueError on a damaged header or payload
            raise UserError(f"could not read checkpoint {path}: it is not a valid safetensors file "
                            f"({type(err).__name__}); download or export it again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except UserError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not read checkpoint {path} ({first}); download or re-create it") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return {"state_dict": obj}
    raise UserError(f"checkpoint {path} holds neither a state dict nor a Lightning container")


def load_state_dict_file(path, download_name=None):
    """The name -> tensor mapping of a checkpoint (.ckpt Lightning container, bare .pt/.pth, .safetensors)."""
    return load_checkpoint(path, download_name)["state_dict"]


# Keys official checkpoints may carry that a model built from the inference configs need not hold
# (unexpected), or may lack (missing). Anything else is an error.
IGNORABLE_UNEXPECTED_KEYS = (
    "model_ema.decay",
    "model_ema.num_updates",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
)
IGNORABLE_MISSING_KEYS = (
    # transformers >= 4.31 no longer saves it; the value is arange(77) either way
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
)


def _key_list(keys, limit=20):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} keys in total)" if len(keys) > limit else "")


def load_checked(module, state_dict, ignorable_unexpected=(), ignorable_missing=(), ignorable_prefixes=()):
    """load_state_dict with a named whitelist instead of strict=False; other mismatches raise UserError."""
    own = module.state_dict()
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict]
    bad_unexpected = [k for k in unexpected if k not in ignorable_unexpected
                      and not any(k.startswith(p) for p in ignorable_prefixes)]
    bad_missing = [k for k in missing if k not in ignorable_missing]
    if bad_missing or bad_unexpected:
        parts = []
        if bad_missing:
            parts.append(f"missing keys: {_key_list(bad_missing)}")
        if bad_unexpected:
            parts.append(f"unexpected keys: {_key_list(bad_unexpected)}")
        raise UserError(f"checkpoint does not match {type(module).__name__}: " + "; ".join(parts))
    shapes = [k for k in state_dict if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if shapes:
        raise UserError("checkpoint shapes do not match the model for keys: " + _key_list(
            [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]))
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def _ema_shadow_map(model):
    """checkpoint key of each EMA shadow (`model_ema.<name without dots>`) -> model key (`model.<name>`)."""
    inner = getattr(model, "model", None)
    if inner is None:
        return {}
    return {"model_ema." + name.replace(".", ""): "model." + name for name, _ in inner.named_parameters()}


def load_model_from_config(config, ckpt, use_ema_weights=False, device="cpu", download_name=None,
                           trust_config=False):
    """Build config.model (or config itself if it has a target) and load `ckpt` into it, checked.

    EMA shadows (`model_ema.*`) in the checkpoint are matched to the model's `model.*` parameters; with
    use_ema_weights they replace them. trust_config: allow config targets outside the toolkit and torch.
    Returns the model in eval mode with `.global_step` set when known.
    """
    model_cfg = config["model"] if "model" in config else config
    container = load_checkpoint(ckpt, download_name)
    sd = collections.OrderedDict(container["state_dict"])
    model = instantiate_from_config(model_cfg, trust_config=trust_config)
    shadow_map = _ema_shadow_map(model)
    has_ema_module = hasattr(model, "model_ema")
    present = [k for k in shadow_map if k in sd]
    if use_ema_weights and not present:
        raise UserError(f"checkpoint {ckpt} holds no EMA weights (model_ema.*), but EMA weights were requested")
    if present and len(present) != len(shadow_map):
        absent = [k for k in shadow_map if k not in sd]
        raise UserError(f"checkpoint {ckpt} has an incomplete EMA set; missing: {_key_list(absent)}")
    ema_weights = {shadow_map[k]: sd[k] for k in present}
    if not has_ema_module:  # the shadows have no home in this model: consumed here, not loaded
        for k in present:
            del sd[k]
    load_checked(model, sd, IGNORABLE_UNEXPECTED_KEYS, IGNORABLE_MISSING_KEYS)
    if use_ema_weights:
        missing = model.load_state_dict(ema_weights, strict=False).unexpected_keys
        assert not missing, missing
    model.global_step = container.get("global_step")
    return model.to(device).eval()
