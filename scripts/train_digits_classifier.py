#!/usr/bin/env python
"""Train the digits CNN used as the feature extractor of the embedded digits benchmark.

Trains on the digits "train" split with light augmentation (random shift of up to 2 px, slight scale,
blur, noise and contrast changes, so that generated digits, which are a little off the data, are still
classified well), reports accuracy on the "heldout" split and writes the weights atomically as safetensors
with the held-out accuracy in the metadata. Deterministic for a given --seed. Runs on one CPU thread in
about a minute.
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from evaluation.digits_cnn import DEFAULT_DIGITS_CNN_PATH, DigitsCNN  # noqa: E402
from ldm.data.digits import load_digits_split  # noqa: E402
from ldm.util import UserError, atomic_write_bytes, cli_main  # noqa: E402

SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LR = 2e-3
WEIGHT_DECAY = 5e-4
WIDTH = 32
MAX_SHIFT_PX = 2.0


def gaussian_blur(x, sigma):
    """Per-sample Gaussian blur with a 5-tap separable kernel; sigma is a [N] tensor."""
    taps = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-taps[None, :] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # [N,5]
    n, c, h, w = x.shape
    xp = F.pad(x + 1.0, (2, 2, 2, 2)) - 1.0  # pad with the background value -1
    rows = sum(k[:, i, None, None, None] * xp[:, :, :, i:i + w] for i in range(5))  # [N,C,H+4,W]
    return sum(k[:, i, None, None, None] * rows[:, :, i:i + h, :] for i in range(5))


def augment(x, gen):
    """Random shift (<= 2 px), scale 0.9-1.1, small rotation, blur, contrast and noise; background stays -1."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    scale = 0.9 + 0.2 * u(n)
    angle = (u(n) - 0.5) * 2 * math.radians(8)
    shift = (u(n, 2) - 0.5) * 2 * MAX_SHIFT_PX * 2 / x.shape[-1]  # pixels -> normalized grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    blur_amount = (u(n) < 0.5).float() * u(n)  # half the images get a blend towards a blurred copy
    blurred = gaussian_blur(x, 0.5 + 0.7 * u(n))
    x = x + blur_amount[:, None, None, None] * (blurred - x)
    contrast = 0.85 + 0.3 * u(n)
    x = (x + 1.0) * contrast[:, None, None, None] - 1.0
    noise_std = 0.08 * u(n)
    x = x + noise_std[:, None, None, None] * torch.randn(x.shape, generator=gen)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(model, images, labels, batch_size=512):
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def train(args):
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = load_digits_split("train")
    held_x, held_y = load_digits_split("heldout")
    model = DigitsCNN(width=args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    bar = tqdm(range(args.epochs), desc="digits-cnn", disable=args.no_progress)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            x, y = augment(train_x[idx], gen), train_y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(idx)
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", train_acc=f"{correct / total:.3f}")
    seconds = time.time() - start
    return model, accuracy(model, held_x, held_y), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_DIGITS_CNN_PATH, help="output .safetensors path (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of init, batch order and augmentation")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs over the train split")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="minibatch size")
    p.add_argument("--lr", type=float, default=LR, help="peak learning rate of the one-cycle AdamW schedule")
    p.add_argument("--width", type=int, default=WIDTH, help="channels of the first conv block")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 leaves cores for other jobs)")
    p.add_argument("--min-accuracy", type=float, default=0.97,
                   help="refuse to write weights whose held-out accuracy is below this")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        raise UserError(f"--out must end in .safetensors, got {args.out}")
    torch.set_num_threads(args.threads)
    model, acc, seconds = train(args)
    print(f"held-out accuracy {acc:.4f} after {seconds:.1f} s of training")
    if acc < args.min_accuracy:
        raise UserError(f"held-out accuracy {acc:.4f} is below --min-accuracy {args.min_accuracy}; weights not written")
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"heldout_accuracy": f"{acc:.6f}", "config": json.dumps({"width": args.width, "num_classes": 10}),
            "seed": str(args.seed), "epochs": str(args.epochs), "train_seconds": f"{seconds:.1f}",
            "data": "ldm.data.digits train split (sklearn digits, stratified 80/20, random_state=0)"}
    atomic_write_bytes(args.out, save(state, metadata=meta))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli_main(main)
