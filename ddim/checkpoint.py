"""Where the pixel-space DDIM checkpoints live, and strict, safe loading of them.

The official CIFAR-10 files (pesser/pytorch_diffusion's conversion of the TF DDPM checkpoint at step 790k) are
bare `torch.save(model.state_dict())` pickles; EMA and non-EMA files share one key set, so "EMA" is only a
matter of which file is chosen. scripts/download_models.sh puts them at the paths below (the peers' default
is the EMA file). Loading goes through ldm.util.load_checkpoint (a restricted unpickler: tensors and plain
containers only, nothing in the file is executed) and then a strict key/shape check.
"""
import os

from ldm.util import UserError, load_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# download name -> (URL, MD5, path under the repository); the URLs and MD5s of ermongroup/ddim's ckpt_util
OFFICIAL_CHECKPOINTS = {
    "cifar10": ("https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1",
                "1fa350b952534ae442b1d5235cce5cd3", "models/ddim/cifar10/model-790000.ckpt"),
    "cifar10-nonema": ("https://heibox.uni-heidelberg.de/f/869980b53bf5416c8a28/?dl=1",
                       "82ed3067fd1002f5cf4c339fb80c4669", "models/ddim/cifar10-nonema/model-790000.ckpt"),
}
CIFAR10_EMA_CKPT = os.path.join(REPO_ROOT, OFFICIAL_CHECKPOINTS["cifar10"][2])
CIFAR10_NONEMA_CKPT = os.path.join(REPO_ROOT, OFFICIAL_CHECKPOINTS["cifar10-nonema"][2])
CIFAR10_CONFIG = os.path.join(REPO_ROOT, "configs", "ddim", "cifar10.yml")
DIGITS_PIXEL_CKPT = os.path.join(REPO_ROOT, "models", "ddim", "digits-pixel", "model.ckpt")
DIGITS_PIXEL_CONFIG = os.path.join(REPO_ROOT, "configs", "ddim", "digits-pixel.yml")


def download_name_for(path):
    """The scripts/download_models.sh name of an official checkpoint path (by its folder), else None."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder if folder in OFFICIAL_CHECKPOINTS else None


def _require(path, download_name):
    if os.path.isfile(path):
        return
    name = download_name or download_name_for(path)
    if name is not None:
        raise UserError(f"checkpoint {path} not found; download it with `bash scripts/download_models.sh {name}`")
    if os.path.abspath(path) == DIGITS_PIXEL_CKPT:
        raise UserError(f"checkpoint {path} not found; recreate it with `python scripts/train_digits_pixel.py`")
    raise UserError(f"checkpoint {path} not found; pass the path of a ddim Model state dict")


def _examples(keys, limit=3):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def load_model_weights(model, path, download_name=None):
    """Load a ddim Model checkpoint (bare state dict, or a container with "state_dict") strictly into `model`.

    Returns the container (its other entries, e.g. a training record, may be useful). Any missing or
    unexpected key, or a shape mismatch, is a UserError naming the checkpoint and the config.
    """
    path = os.fspath(path)
    _require(path, download_name)
    container = load_checkpoint(path, download_name or download_name_for(path))
    state_dict = container["state_dict"]
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = [f"{len(v)} {what} ({_examples(v)})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)) if v]
        raise UserError(f"checkpoint {path} does not fit the model built from this config: {'; '.join(parts)}; "
                        "pass the config the checkpoint was made with")
    model.load_state_dict(state_dict, strict=True)
    return container
