"""A small CNN classifier for 32x32 RGB digits: the feature extractor of the embedded digits benchmark.

It plays the role InceptionV3 plays for ImageNet: `pool` features for FID / precision / recall, a small
`spatial` map for sFID and `logits` for IS and conditional accuracy. The weights are trained by
scripts/train_digits_classifier.py and shipped in models/evaluation/digits_cnn.safetensors.
"""
import json
import os

import numpy as np
import torch
import torch.nn as nn

from ldm.util import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIGITS_CNN_PATH = os.path.join(REPO_ROOT, "models", "evaluation", "digits_cnn.safetensors")
SPATIAL_CHANNELS = 4  # like sFID's "first 7 channels": a few channels of a mid-level map keep it small


def _conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """conv blocks 32x32 -> 16x16 -> 8x8, global average pool, linear head over 10 classes."""

    def __init__(self, width=32, num_classes=10):
        super().__init__()
        self.width = width
        self.block1 = nn.Sequential(_conv_bn_relu(3, width), _conv_bn_relu(width, width), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(_conv_bn_relu(width, 2 * width), _conv_bn_relu(2 * width, 2 * width),
                                    nn.MaxPool2d(2))
        self.block3 = _conv_bn_relu(2 * width, 4 * width)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.features(x)["logits"]

    def features(self, x):
        """x float [N,3,32,32] in [-1,1] -> dict(pool [N,4w], spatial [N,4*8*8], logits [N,10])."""
        mid = self.block2(self.block1(x))  # [N, 2w, 8, 8]
        pool = self.block3(mid).mean(dim=(2, 3))
        # spatial: first channels of the 8x8 map, flattened in HWC order like the ADM evaluator's sFID
        spatial = mid[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": self.fc(self.dropout(pool))}


def read_digits_cnn_metadata(path=DEFAULT_DIGITS_CNN_PATH):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        return dict(fh.metadata() or {})


def load_digits_cnn(path=None, map_location="cpu"):
    """The trained DigitsCNN in eval mode, from .safetensors (metadata holds the width) or a weights-only .pt."""
    path = path or DEFAULT_DIGITS_CNN_PATH
    if not os.path.isfile(path):
        raise UserError(f"digits classifier weights not found at {path}; run scripts/train_digits_classifier.py "
                        f"to create them")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device=str(map_location))
            meta = read_digits_cnn_metadata(path)
            width = int(json.loads(meta.get("config", "{}")).get("width", 32))
        else:
            obj = torch.load(path, map_location=map_location, weights_only=True)
            state = obj.get("state_dict", obj)
            width = int(obj.get("meta", {}).get("width", 32)) if isinstance(obj.get("meta"), dict) else 32
        model = DigitsCNN(width=width)
        model.load_state_dict(state)
    except Exception as err:  # damaged file, another network's weights, a non-weights file
        raise UserError(f"{path} is not a readable digits classifier ({type(err).__name__}); pass the shipped "
                        "models/evaluation/digits_cnn.safetensors or re-train with "
                        "scripts/train_digits_classifier.py") from None
    return model.eval().requires_grad_(False)


class DigitsExtractor:
    """Feature extractor for uint8 NHWC 32x32x3 digits images (the interface evaluation.evaluate uses)."""

    name = "digits-cnn"

    def __init__(self, path=None, batch_size=500, device="cpu"):
        self.weights_path = path or DEFAULT_DIGITS_CNN_PATH
        self.model = load_digits_cnn(self.weights_path).to(device)
        self.num_classes = int(self.model.fc.out_features)
        self.batch_size = batch_size
        self.device = device

    def describe(self):
        path = self.weights_path
        meta = read_digits_cnn_metadata(path) if path.endswith(".safetensors") else {}
        return {"extractor": self.name, "weights": os.path.relpath(path, REPO_ROOT) if path.startswith(REPO_ROOT) else path,
                "heldout_accuracy": float(meta["heldout_accuracy"]) if "heldout_accuracy" in meta else None}

    @torch.no_grad()
    def __call__(self, images_uint8):
        images = np.asarray(images_uint8)
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
            raise UserError(f"the digits extractor expects uint8 images of shape [N,32,32,3], got "
                            f"{images.dtype} {images.shape}")
        x = torch.from_numpy(np.array(images)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out = self.model.features(x)
        return {k: v.float().cpu().numpy() for k, v in out.items()}
