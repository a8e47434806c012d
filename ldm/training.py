"""Helpers shared by the scripts that train the embedded models here (scripts/train_digits_*.py): the learning-rate
schedule, the resumable-checkpoint check and the weight digest that the bit-reproducibility checks compare; and the
seeded stand-in weights that tests and benchmarks give models whose real weights are not here."""
import hashlib
import math
import os

import torch

from ldm.util import UserError


def absolutize(args, names, root):
    """Make the path flags `names` of `args` absolute against `root` (the repository), leaving None alone."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not os.path.isabs(value):
            setattr(args, name, os.path.join(root, value))
    return args


def lr_at(step, peak, total, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to 5% of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_state(path, args, keys):
    """The resumable checkpoint at `path` if present (None otherwise); refuses one made with other values of the
    training arguments `keys`, since continuing it would mix two runs."""
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    wanted = {k: getattr(args, k) for k in keys}
    if state["args"] != wanted:
        diff = [k for k in keys if state["args"].get(k) != wanted[k]]
        raise UserError(f"{path} was made with different training arguments ({', '.join(diff)}); rerun with "
                        f"them or use a fresh --work_dir")
    return state


def state_dict_sha256(state_dict):
    """sha256 over every tensor's name, dtype, shape and raw bytes, in key order: equal digests mean bitwise equal
    weights (the container's other fields, e.g. the recorded wall times, do not enter)."""
    h = hashlib.sha256()
    for key, value in state_dict.items():
        value = value.detach().cpu().contiguous()
        h.update(f"{key} {value.dtype} {tuple(value.shape)}\n".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def deterministic_init_(module, seed=0):
    """Overwrite every parameter in named_parameters() order from one seeded generator (the recipe of the
    reference README): 1-D `*weight` 1 + 0.1·N(0,1), other 1-D 0.1·N(0,1), N-D N(0,1)/sqrt(fan-in). The zero-
    initialised output convs become non-zero, so every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 1:
            p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
        else:
            p.copy_(noise / max(1, p[0].numel()) ** 0.5)
    return module
