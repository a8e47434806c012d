"""The embedded digits data set: scikit-learn's 8x8 handwritten digits as 32x32 RGB images.

Shared by the digits LDM (training), the digits CNN (evaluation) and the tests, so every part sees the
identical preprocessing and the identical train / held-out split (CONTRACTS interface 6).
"""
import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "heldout")


def _all_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # pixel values are integers 0..16
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1) * 2.0 - 1.0
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images.contiguous(), labels


def split_indices(split: str):
    """Indices into sklearn's load_digits() of one split (stratified 80/20, random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    labels = load_digits().target
    train_idx, heldout_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    return train_idx if split == "train" else heldout_idx


def load_digits_split(split: str):
    """(images float32 [N,3,32,32] in [-1,1], labels int64 [N]) of the "train" or "heldout" split."""
    idx = torch.from_numpy(split_indices(split))
    images, labels = _all_digits()
    return images[idx].contiguous(), labels[idx].contiguous()


def to_uint8(x):
    """[-1,1] tensor [N,C,H,W] -> uint8 numpy NHWC by round(255 * clamp((x+1)/2, 0, 1)) (EVALUATION.md decode)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    x = torch.clamp((x + 1.0) / 2.0, 0.0, 1.0)
    x = torch.round(x * 255.0).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()
