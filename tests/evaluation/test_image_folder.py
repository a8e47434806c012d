"""Real-image folder reader: EDA-DM's center crop + bicubic resize, file order, the .npz it writes, errors."""
import json

import numpy as np
import pytest
from PIL import Image

from evaluation.image_folder import folder_to_npz, load_image_folder
from ldm.util import UserError


def _framed(w, h, inner, outer):
    """w x h image: colour `inner` on the central min(w,h) square, `outer` on the cropped-away margins."""
    a = np.empty((h, w, 3), np.uint8)
    a[:] = outer
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    a[top:top + side, left:left + side] = inner
    return Image.fromarray(a)


def test_center_crop_and_resize(tmp_path):
    _framed(64, 40, (10, 200, 30), (255, 0, 0)).save(tmp_path / "b.png")  # landscape
    _framed(30, 50, (0, 0, 250), (0, 255, 0)).save(tmp_path / "a.png")  # portrait
    (tmp_path / "notes.txt").write_text("ignored")
    images = load_image_folder(str(tmp_path), size=300)
    assert images.shape == (2, 300, 300, 3) and images.dtype == np.uint8
    # sorted names: a.png first; only the central square survives, so each image is one flat colour
    assert (images[0] == (0, 0, 250)).all() and (images[1] == (10, 200, 30)).all()
    out = folder_to_npz(str(tmp_path), str(tmp_path / "ref.npz"), size=32)
    with np.load(out) as data:
        assert data["arr_0"].shape == (2, 32, 32, 3)
        meta = json.loads(str(data["meta"]))
    assert meta["resize_rule"] == "eda-dm" and meta["size"] == 32 and "bicubic" in meta["resize"]


def test_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image_folder(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no .png"):
        load_image_folder(str(tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "b.png")
    with pytest.raises(UserError, match="different sizes"):
        load_image_folder(str(tmp_path), rule="none")
    assert load_image_folder(str(tmp_path), size=4).shape == (2, 4, 4, 3)
