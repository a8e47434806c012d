"""A folder of real images (e.g. COCO val2014) as the uint8 NHWC array the evaluator takes, with a named resize.

The text-to-image peers compute FID against resized real COCO images: EDA-DM center-crops each image to a square
and resizes it to 300x300 with bicubic interpolation before pytorch-fid's InceptionV3 (TXT2IMG_CIFAR.md A.4).
`folder_to_npz` writes such an array as an ADM-style reference .npz for `05_evaluate.py` / evaluate_npz.
"""
import io
import json
import os

import numpy as np

from ldm.util import UserError, atomic_write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
RESIZE_RULES = {
    "eda-dm": "center crop to the shorter side, then bicubic resize to size x size (PIL), as EDA-DM's val2014_resize",
    "none": "images used as they are (all must share one size)",
}


def list_images(folder):
    if not os.path.isdir(folder):
        raise UserError(f"image folder {folder} does not exist; pass a folder of .png / .jpg images")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise UserError(f"image folder {folder} holds no .png / .jpg images")
    return [os.path.join(folder, n) for n in names]


def center_crop_resize(image, size):
    """PIL image -> the central square of side min(w, h), resized to size x size with bicubic interpolation."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def load_image_folder(folder, rule="eda-dm", size=300, limit=None):
    """uint8 [N, H, W, 3] of the folder's images in sorted file-name order, resized by `rule`."""
    from PIL import Image

    if rule not in RESIZE_RULES:
        raise UserError(f"unknown resize rule {rule!r}; choose one of {', '.join(RESIZE_RULES)}")
    out = []
    for path in list_images(folder)[:limit]:
        with Image.open(path) as img:
            img = img.convert("RGB")
            out.append(np.asarray(center_crop_resize(img, size) if rule == "eda-dm" else img))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise UserError(f"images in {folder} have different sizes {sorted(shapes)[:3]}; use the eda-dm resize rule")
    return np.stack(out)


def folder_to_npz(folder, out_path, rule="eda-dm", size=300, limit=None):
    """Write the folder as an .npz (arr_0 uint8 NHWC, meta naming the folder and the resize rule)."""
    images = load_image_folder(folder, rule, size, limit)
    meta = {"source": os.path.abspath(folder), "resize_rule": rule, "resize": RESIZE_RULES[rule],
            "size": size if rule == "eda-dm" else None, "num_images": int(len(images)), "order": "sorted file names"}
    buf = io.BytesIO()
    np.savez(buf, arr_0=images, meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic_write_bytes(out_path, buf.getvalue())
    return out_path
