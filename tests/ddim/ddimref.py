"""The shared ddim reference data (reference/ddim, made with the original ermongroup/ddim code).

Found at $MPQDM_SHARED/reference/ddim, else beside the repository (/work/shared/reference/ddim on the build
machine); a test whose file is absent is skipped with the path it looked for.
"""
import json
from collections import OrderedDict

import pytest
import torch

from refdata import shared_dir


def ddim_ref_dir():
    return shared_dir() / "reference" / "ddim"


def require_ddim(name):
    path = ddim_ref_dir() / name
    if not path.exists():
        pytest.skip(f"ddim reference data not found: {path} (set MPQDM_SHARED to the folder holding "
                    "reference/ddim)")
    return path


def load_ddim_record(name):
    return torch.load(require_ddim(f"{name}.pt"), weights_only=True)


def load_ddim_json(name):
    with open(require_ddim(name)) as fh:
        return json.load(fh, object_pairs_hook=OrderedDict)


def build_reference_model(record):
    """The record's tiny Model with its stored weights loaded strictly, in eval mode."""
    from ddim.config import model_config
    from ddim.models.diffusion import Model

    model = Model(model_config(record["model"], record["image_size"]))
    model.load_state_dict(record["state_dict"], strict=True)
    return model.eval()
