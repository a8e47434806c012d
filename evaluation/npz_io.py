"""Reading ADM-style sample / reference `.npz` files without loading 10 GB at once.

An ADM sample file holds `arr_0` (uint8 [N,H,W,3]), optionally `arr_1` (labels [N]) and, in this toolkit,
`meta` (a JSON string). `np.load` would materialise `arr_0` entirely, so images are streamed in batches
straight from the zip member's .npy payload (compressed or not).
"""
import hashlib
import json
import os
import zipfile

import numpy as np
from numpy.lib import format as npy_format

from ldm.util import UserError


def file_sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _check_npz(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; pass an ADM-style .npz file with images in arr_0")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz file; save images with np.savez(path, arr_0=uint8 [N,H,W,3])")


def npz_keys(path):
    _check_npz(path)
    with zipfile.ZipFile(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def _open_member(zf, key):
    fh = zf.open(f"{key}.npy")
    version = npy_format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
    if fortran or dtype.hasobject:
        fh.close()
        raise UserError(f"array {key} must be a C-ordered numeric array, got fortran={fortran} dtype={dtype}")
    return fh, shape, dtype


def npz_array_info(path, key="arr_0"):
    """(shape, dtype) of one array of an .npz file, read from its header only."""
    _check_npz(path)
    with zipfile.ZipFile(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise UserError(f"{path} has no array {key!r} (it holds {npz_keys(path)})")
        fh, shape, dtype = _open_member(zf, key)
        fh.close()
    return shape, dtype


def iter_npz_batches(path, key="arr_0", batch_size=256, limit=None):
    """Yield consecutive row batches of one array of an .npz file (at most `limit` rows in total)."""
    _check_npz(path)
    with zipfile.ZipFile(path) as zf:
        fh, shape, dtype = _open_member(zf, key)
        with fh:
            n = shape[0] if limit is None else min(shape[0], limit)
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, n, batch_size):
                rows = min(batch_size, n - start)
                buf = fh.read(rows * row_bytes)
                if len(buf) != rows * row_bytes:
                    raise UserError(f"{path} is truncated: array {key} ends before row {start + rows}")
                yield np.frombuffer(buf, dtype=dtype).reshape((rows,) + tuple(shape[1:]))


def load_npz_array(path, key):
    _check_npz(path)
    with np.load(path, allow_pickle=False) as data:
        if key not in data.files:
            raise UserError(f"{path} has no array {key!r} (it holds {data.files})")
        return data[key]


def read_npz_meta(path):
    """The `meta` JSON entry of a toolkit sample file as a dict, or None when the file has none."""
    if "meta" not in npz_keys(path):
        return None
    raw = load_npz_array(path, "meta")
    text = raw.item() if raw.shape == () else raw.tobytes().decode("utf-8")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"the meta entry of {path} is not valid JSON")
    return meta if isinstance(meta, dict) else {"meta": meta}


def check_image_array(path, key="arr_0"):
    """Shape of a valid uint8 [N,H,W,3] image array, or a UserError naming what is wrong."""
    shape, dtype = npz_array_info(path, key)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise UserError(f"{path}:{key} must be uint8 images [N,H,W,3] (EVALUATION.md storage rule), "
                        f"got {dtype} {tuple(shape)}")
    if shape[0] < 2:
        raise UserError(f"{path}:{key} holds {shape[0]} image(s); at least 2 are needed for statistics")
    return tuple(shape)
