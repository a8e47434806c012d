"""Streaming reads of ADM .npz files match np.load; bad files are user errors."""
import json

import numpy as np
import pytest

from evaluation.npz_io import check_image_array, iter_npz_batches, read_npz_meta
from ldm.util import UserError


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_batches_match_np_load(tmp_path, save):
    images = np.random.default_rng(0).integers(0, 256, (11, 5, 4, 3), dtype=np.uint8)
    save(tmp_path / "a.npz", arr_0=images, meta=np.array(json.dumps({"seed": 3})))
    batches = list(iter_npz_batches(tmp_path / "a.npz", batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 3] and np.array_equal(np.concatenate(batches), images)
    assert check_image_array(tmp_path / "a.npz") == (11, 5, 4, 3)
    assert read_npz_meta(tmp_path / "a.npz") == {"seed": 3}


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_image_array(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not an .npz"):
        check_image_array(tmp_path / "text.npz")
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(UserError, match=r"uint8 images \[N,H,W,3\]"):
        check_image_array(tmp_path / "gray.npz")
    assert read_npz_meta(tmp_path / "gray.npz") is None
