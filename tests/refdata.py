"""The shared reference data (reference/ldm, made with the original CompVis code) for every test package.

Found at $MPQDM_SHARED, else at the `shared` directory beside the repository; a test whose file is absent is
skipped with the path it looked for.
"""
import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch


def shared_dir() -> Path:
    env = os.environ.get("MPQDM_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


def ref_dir() -> Path:
    return shared_dir() / "reference" / "ldm"


ldm_reference_dir = ref_dir


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found: {path} (set MPQDM_SHARED to the shared dir)")
    return path


def _merge(files):
    sd = OrderedDict()
    for fname in files:
        sd.update(torch.load(require(ref_dir() / "vectors" / fname), weights_only=True)["state_dict"])
    return sd


def load_vector(name):
    """vectors/<name>.pt and its state dict (weight parts merged in weights_files order)."""
    record = torch.load(require(ref_dir() / "vectors" / f"{name}.pt"), weights_only=True)
    return record, _merge(record["weights_files"])


def load_composed(name):
    """A tiny LatentDiffusion record (e/f) and its full state dict in all_keys_in_order."""
    record = torch.load(require(ref_dir() / "vectors" / f"{name}.pt"), weights_only=True)
    sd = {}
    for prefix, files in record["weights_composition"].items():
        part = _merge(files)
        sd.update(part if prefix == "<all other keys>" else {prefix + k: v for k, v in part.items()})
    return record, OrderedDict((k, sd[k]) for k in record["all_keys_in_order"])


def load_json(relpath):
    with open(require(ref_dir() / relpath)) as fh:
        return json.load(fh, object_pairs_hook=OrderedDict)


def build_tiny_ldm(name):
    """Instantiate the record's LatentDiffusion config and load the composed weights strictly."""
    from ldm.util import instantiate_from_config
    record, sd = load_composed(name)
    model = instantiate_from_config(record["config"])
    model.load_state_dict(sd, strict=True)
    return record, model.eval()


def close(actual, expected, rtol=1e-4, atol=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def close_latent(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
