"""The shared reference data (reference/ldm, made with the original CompVis code) for every test package, and the
tiny models the tests build from the repository's own files.

The reference vectors are not part of the repository: they live in the project's shared folder, found at
$MPQDM_SHARED, else at the `shared` directory beside the checkout. A test that compares against a reference file
that is absent is skipped with a reason naming the file and where the vectors come from; everything else (tiny
models with a deterministic init, the repository's configs, the shipped digits model) needs no shared folder.
"""
import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ldm.training import deterministic_init_  # noqa: F401  (tests import it from here)


def shared_dir() -> Path:
    env = os.environ.get("MPQDM_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


def ref_dir() -> Path:
    return shared_dir() / "reference" / "ldm"


ldm_reference_dir = ref_dir


REFERENCE_ORIGIN = ("reference vectors are made with the original CompVis code and kept in the project's shared "
                    "folder (shared/reference/ldm beside the checkout, or $MPQDM_SHARED), not in the repository")


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: {REFERENCE_ORIGIN}")
    return path


# The tiny class-conditional UNet of the reference vector a_unet_cin_tiny (cin256-v2's structure in miniature:
# SpatialTransformer with a context, num_res_blocks 2), built here with a deterministic init so that the quant tests
# run on a plain clone.
TINY_CIN_UNET = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
                     num_res_blocks=2, channel_mult=[1, 1], num_heads=1, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=32)


def tiny_cin_unet(seed=0):
    """A fresh eval-mode tiny cin UNet (TINY_CIN_UNET) with deterministic weights; no reference data needed."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    return deterministic_init_(UNetModel(**TINY_CIN_UNET), seed).eval()


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
