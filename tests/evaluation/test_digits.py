"""Digits data split (CONTRACTS interface 6) and the shipped digits CNN."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.digits_cnn import DEFAULT_DIGITS_CNN_PATH, DigitsExtractor, load_digits_cnn, read_digits_cnn_metadata
from ldm.data.digits import load_digits_split, split_indices, to_uint8


def test_split_sizes_disjoint_and_preprocessing():
    from sklearn.datasets import load_digits

    train_idx, held_idx = split_indices("train"), split_indices("heldout")
    assert len(train_idx) == 1437 and len(held_idx) == 360
    assert not set(train_idx) & set(held_idx) and len(set(train_idx) | set(held_idx)) == 1797
    x, y = load_digits_split("heldout")
    assert x.shape == (360, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and np.bincount(y.numpy()).min() >= 35  # stratified
    raw = load_digits()
    i = held_idx[5]
    expected = F.interpolate(torch.tensor(raw.images[i] / 16.0, dtype=torch.float32)[None, None], size=(32, 32),
                             mode="bilinear", align_corners=False)[0, 0] * 2 - 1
    assert torch.allclose(x[5, 0], expected) and torch.equal(x[5, 0], x[5, 2]) and y[5].item() == raw.target[i]


def test_to_uint8_rule():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 2, 3).repeat(1, 3, 1, 1)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 3, 3)
    assert u[0, :, :, 0].reshape(-1).tolist() == [0, 0, 128, 191, 255, 255]  # round(255 * clamp((x+1)/2))


def test_shipped_cnn_heldout_accuracy_and_features():
    assert os.path.getsize(DEFAULT_DIGITS_CNN_PATH) < 1_000_000
    assert float(read_digits_cnn_metadata()["heldout_accuracy"]) >= 0.97
    x, y = load_digits_split("heldout")
    ext = DigitsExtractor()
    feats = ext(to_uint8(x))  # through the uint8 path that evaluation uses
    assert (feats["logits"].argmax(1) == y.numpy()).mean() >= 0.97
    assert feats["pool"].shape == (360, 128) and feats["spatial"].shape == (360, 256) and feats["logits"].shape[1] == 10


def test_weights_only_torch_file(tmp_path):
    model = load_digits_cnn()
    torch.save({"state_dict": model.state_dict(), "meta": {"width": 32}}, tmp_path / "cnn.pt")
    other = load_digits_cnn(str(tmp_path / "cnn.pt"))
    x, _ = load_digits_split("heldout")
    with torch.no_grad():
        assert torch.equal(model(x[:8]), other(x[:8]))


def test_missing_weights_is_user_error(tmp_path):
    from ldm.util import UserError

    with pytest.raises(UserError, match="train_digits_classifier"):
        load_digits_cnn(str(tmp_path / "missing.safetensors"))
