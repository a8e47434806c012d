"""Locate and load the shared reference data (reference/ldm) for the ldm tests."""
import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch


def shared_dir() -> Path:
    """The team's shared dir: $MPQDM_SHARED, else the sibling `shared` of the repo root."""
    env = os.environ.get("MPQDM_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared"


def ldm_reference_dir() -> Path:
    return shared_dir() / "reference" / "ldm"


def require(path: Path) -> Path:
    """Skip the calling test (with the reason) when a reference file is absent."""
    if not path.exists():
        pytest.skip(f"reference data not found: {path} (set MPQDM_SHARED to the shared dir)")
    return path


def load_vector(name: str):
    """A vectors/<name>.pt record plus its merged state_dict (weight parts merged in weights_files order)."""
    vec_dir = ldm_reference_dir() / "vectors"
    record = torch.load(require(vec_dir / f"{name}.pt"), weights_only=True)
    state = OrderedDict()
    for fname in record["weights_files"]:
        state.update(torch.load(require(vec_dir / fname), weights_only=True)["state_dict"])
    return record, state


def load_json(relpath: str):
    with open(require(ldm_reference_dir() / relpath)) as fh:
        return json.load(fh, object_pairs_hook=OrderedDict)
