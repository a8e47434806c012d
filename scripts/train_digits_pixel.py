#!/usr/bin/env python
"""Train the embedded pixel-space digits model (configs/ddim/digits-pixel.yml) from scratch on the CPU.

The model is ermongroup/ddim's `Model` in miniature (see the config), trained unconditionally on the digits
TRAIN split (32x32x3 in [-1, 1], ldm.data.digits) with the original objective: eps-prediction, the squared
error summed over pixels and averaged over the batch, antithetic timesteps (t and T-1-t), the linear
1e-4..0.02 schedule over 1000 steps. Two departures make the short CPU budget go further, both switchable:
the residual branches start at zero (--init) and the loss is Min-SNR weighted (--min_snr_gamma). AdamW with
warm-up and cosine decay, gradient clipping, and an EMA of the weights, which is what gets exported.

The run writes a resumable checkpoint to --work_dir every --ckpt_every steps; rerunning the same command
continues where it stopped and gives the same weights as an uninterrupted run (same --threads). The result is
{"state_dict": <Model state dict, EMA weights>, "training": {...}} at --out (ddim.checkpoint loads it); the
training record holds the weights' sha256 (ldm.training.state_dict_sha256), which a rerun with the same flags
reproduces (the recorded wall times differ, so the file's own bytes do not) with the same torch version and
--threads on any x86 CPU with AVX2: the script caps the CPU kernels at AVX2 (CPU_ISA_PINS) before torch loads.

Afterwards (or alone with --eval_only) it samples --eval_samples images per schedule in --eval_schedules
(DDIM, eta 0) and reports the digits CNN's view of them: the fraction classified with confidence > 0.9, the
class histogram, and FID / IS / precision / recall against the training digits; --grid writes 64 samples.
"""
import argparse
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Float sums in the CPU kernels depend on the vector width, and 2,000 Adam steps amplify a last-bit difference
# into other weights (measured: the same flags on an AVX-512 CPU gave max |dw| 0.70 against the AVX2-trained model).
# Capping ATen, oneDNN and MKL at AVX2 before torch loads makes every AVX2-or-newer x86 CPU compute the same bits
# (the shipped model is reproduced this way on an AVX-512 EPYC); set the variables yourself to override. Only when
# run as a script: imported (tests), torch is loaded already, and the caps would leak into other libraries of the
# process (OpenVINO's oneDNN, capped after it chose its kernels, crashes).
CPU_ISA_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
if __name__ == "__main__":
    for _name, _value in CPU_ISA_PINS.items():
        os.environ.setdefault(_name, _value)

import torch  # noqa: E402

from ldm.cli import ArgumentParser, nonneg_float, nonneg_int, positive_float, positive_int, probability  # noqa: E402
from ldm.util import atomic_save, atomic_write_bytes, cli_main  # noqa: E402
from ldm.training import absolutize, load_state, lr_at, state_dict_sha256  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ("seed", "config", "steps", "batch_size", "lr", "warmup", "grad_clip", "ema_decay", "init",
              "min_snr_gamma", "threads")
CONFIDENCE = 0.9


def schedule_list(text):
    """type= validator: comma-separated skip_type:steps items, e.g. "quad:100,uniform:20"."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, steps = item.partition(":")
        if kind not in ("quad", "uniform") or not steps.isdigit() or not 1 <= int(steps) <= 1000:
            raise argparse.ArgumentTypeError(f"expected items like quad:100 or uniform:20, got {item!r}")
        out.append((kind, int(steps)))
    return tuple(out)  # not a list: ldm.cli reads a list value as argparse's dropped "--"


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ddim/digits-pixel.yml", help="ddim model config (YAML)")
    p.add_argument("--out", default="models/ddim/digits-pixel/model.ckpt",
                   help="where the final checkpoint is written (atomically)")
    p.add_argument("--work_dir", default="runs/train_digits_pixel/",
                   help="folder of the resumable training checkpoint; rerun with the same flags to continue")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initialisation, batches, timesteps, noise")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads; results depend on it (float summation order), so it is part of the "
                        "resumable state")
    p.add_argument("--steps", type=positive_int, default=2000, help="optimizer steps")
    p.add_argument("--batch_size", type=positive_int, default=16, help="images per step")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak AdamW learning rate (cosine decay to 5%%)")
    p.add_argument("--warmup", type=nonneg_int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--grad_clip", type=positive_float, default=1.0, help="gradient-norm clipping threshold")
    p.add_argument("--ema_decay", type=probability, default=0.995, help="EMA decay of the exported weights")
    p.add_argument("--init", choices=("zero_out", "default"), default="zero_out",
                   help="zero_out: the last layer of every residual branch (ResnetBlock.conv2, AttnBlock.proj_out) and "
                        "conv_out start at zero, so the network starts as its identity paths (as ADM does); default: "
                        "PyTorch's initialisation everywhere (as the original)")
    p.add_argument("--min_snr_gamma", type=nonneg_float, default=5.0,
                   help="weight each sample's loss by min(SNR, gamma) / SNR (Min-SNR weighting for eps-prediction, "
                        "Hang et al. 2023): less weight on the nearly clean timesteps; 0 = unweighted (the original)")
    p.add_argument("--ckpt_every", type=positive_int, default=250, help="steps between resumable checkpoints")
    p.add_argument("--stop_after", type=positive_int, default=None,
                   help="stop (after saving the resumable checkpoint) once this many steps are done; for "
                        "checking that a resumed run reproduces an uninterrupted one")
    p.add_argument("--eval_only", action="store_true", help="skip training; evaluate the checkpoint at --out")
    p.add_argument("--eval_samples", type=nonneg_int, default=500,
                   help="samples per schedule for the quality report; 0 skips it")
    p.add_argument("--eval_schedules", type=schedule_list, default=schedule_list("quad:100,uniform:20"),
                   help="comma-separated skip_type:steps DDIM schedules (eta 0) to evaluate; default quad:100,uniform:20")
    p.add_argument("--eval_batch", type=positive_int, default=100, help="images per sampling batch")
    p.add_argument("--eval_seed", type=nonneg_int, default=0, help="seed of the evaluation noise")
    p.add_argument("--eval_json", default=None, help="also write the quality report as JSON to this path")
    p.add_argument("--grid", default=None,
                   help="write a PNG of the first 64 samples of the first evaluated schedule to this path")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    absolutize(args, ("config", "out", "work_dir", "eval_json", "grid"), REPO_ROOT)
    return args


def antithetic_timesteps(n, num_timesteps, gen):
    """t for half the batch and T-1-t for the other half (the original's variance reduction)."""
    t = torch.randint(0, num_timesteps, (n // 2 + 1,), generator=gen)
    return torch.cat([t, num_timesteps - t - 1])[:n]


def zero_out_residual_branches(net):
    from ddim.models.diffusion import AttnBlock, ResnetBlock

    last_layers = [m.conv2 for m in net.modules() if isinstance(m, ResnetBlock)]
    last_layers += [m.proj_out for m in net.modules() if isinstance(m, AttnBlock)] + [net.conv_out]
    with torch.no_grad():
        for layer in last_layers:
            layer.weight.zero_()
            layer.bias.zero_()


def loss_weights(model, t, gamma):
    """Min-SNR-gamma weights min(SNR, gamma) / SNR for eps-prediction (all ones when gamma is 0)."""
    if gamma == 0:
        return torch.ones(t.shape)
    alpha_bar = model.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def train(args, config, images):
    from tqdm import tqdm

    from ddim.pipeline import PixelDiffusion

    path = os.path.join(args.work_dir, "train.pt")
    state = load_state(path, args, TRAIN_ARGS)
    torch.manual_seed(args.seed)
    model = PixelDiffusion(config)
    net = model.model.diffusion_model
    if args.init == "zero_out":
        zero_out_residual_branches(net)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, elapsed, cpu = 0, 0.0, 0.0
    if state is not None:
        net.load_state_dict(state["model"])
        ema = list(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed, cpu = state["step"], state["elapsed"], state["cpu"]
    if step >= args.steps:
        return model, ema, (elapsed, cpu)
    bar = tqdm(total=args.steps, initial=step, desc="training the pixel digits model", disable=args.no_progress)
    t0, c0 = time.time(), time.process_time()

    def snapshot():
        atomic_save({"args": {k: getattr(args, k) for k in TRAIN_ARGS}, "step": step, "model": net.state_dict(),
                     "ema": ema, "opt": opt.state_dict(), "gen": gen.get_state(),
                     "elapsed": elapsed + time.time() - t0, "cpu": cpu + time.process_time() - c0}, path)

    net.train()
    while step < args.steps:
        x0 = images[torch.randint(0, len(images), (args.batch_size,), generator=gen)]
        t = antithetic_timesteps(args.batch_size, model.num_timesteps, gen)
        noise = torch.randn(x0.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.steps, args.warmup)
        eps = model.apply_model(model.q_sample(x0, t, noise), t.float())
        per_sample = (noise - eps).square().sum(dim=(1, 2, 3))
        loss = (loss_weights(model, t, args.min_snr_gamma) * per_sample).mean(dim=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.2f}")
        if step % args.ckpt_every == 0 or step == args.steps or step == args.stop_after:
            snapshot()
        if args.stop_after is not None and step >= args.stop_after and step < args.steps:
            bar.close()
            print(f"stopped after step {step} (--stop_after); rerun without it to continue", flush=True)
            return None, None, None
    bar.close()
    return model, ema, (elapsed + time.time() - t0, cpu + time.process_time() - c0)


def export(args, model, ema, seconds, n_train):
    net = model.model.diffusion_model
    with torch.no_grad():  # export the EMA weights as the model weights
        for p, e in zip(net.parameters(), ema):
            p.copy_(e)
    state_dict = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    n_params = sum(v.numel() for v in state_dict.values())
    training = {"script": "scripts/train_digits_pixel.py", "data": "ldm.data.digits train split",
                "n_train": n_train, "args": {k: getattr(args, k) for k in TRAIN_ARGS if k != "config"},
                "config": os.path.relpath(args.config, REPO_ROOT), "seconds": round(seconds[0], 1),
                "cpu_seconds": round(seconds[1], 1),
                "n_params": n_params, "ema_exported": True, "state_dict_sha256": state_dict_sha256(state_dict),
                "torch": str(torch.__version__), "cpu_isa": {k: os.environ.get(k) for k in CPU_ISA_PINS}}
    atomic_save({"state_dict": state_dict, "training": training}, args.out)
    size = os.path.getsize(args.out) / 2 ** 20
    print(f"wrote {args.out} ({size:.2f} MiB, {n_params:,} parameters, weights sha256 "
          f"{training['state_dict_sha256'][:16]}); training wall time {seconds[0]:.0f} s "
          f"(process CPU time {seconds[1]:.0f} s)", flush=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------- evaluation
def sample_uint8(model, n, batch, skip_type, steps, seed, progress):
    """n samples (uint8 NHWC) with DDIM eta 0; x_T of image i from seed * 1000003 + i (batch-independent)."""
    from tqdm import tqdm

    from ldm.data.digits import to_uint8
    from ldm.generate import initial_noise

    shape = (model.channels, model.image_size, model.image_size)
    out = []
    for start in tqdm(range(0, n, batch), desc=f"sampling {skip_type}:{steps}", disable=not progress):
        idx = list(range(start, min(n, start + batch)))
        x = model.sample(initial_noise(seed, idx, shape), steps, skip_type=skip_type, eta=0.0,
                         generator=torch.Generator().manual_seed(seed))
        out.append(to_uint8(x))
    import numpy as np

    return np.concatenate(out)


def quality(images, extractor, reference):
    import numpy as np

    from evaluation.evaluate import score_features

    feats = extractor(images)
    logits = torch.from_numpy(feats["logits"])
    conf, pred = torch.softmax(logits, dim=1).max(dim=1)
    metrics = score_features(feats, reference, min(5000, len(images)))
    return {"n": len(images), "confident_fraction": float((conf > CONFIDENCE).float().mean()),
            "class_histogram": np.bincount(pred.numpy(), minlength=10).tolist(),
            **{k: (None if v is None else float(v)) for k, v in metrics.items()}}


def write_grid(path, images, ncol=8):
    import numpy as np
    from PIL import Image

    images = images[:ncol * ncol]
    rows = -(-len(images) // ncol)
    h, w = images.shape[1:3]
    canvas = np.zeros((rows * h, ncol * w, 3), np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, ncol)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    print(f"wrote {path}", flush=True)


def evaluate(args, model):
    from evaluation.digits_cnn import DEFAULT_DIGITS_CNN_PATH, DigitsExtractor
    from evaluation.reference import reference_features

    if not os.path.isfile(DEFAULT_DIGITS_CNN_PATH):
        print("digits CNN weights not found; skipping the quality report")
        return
    extractor = DigitsExtractor()
    reference = reference_features("digits-train", extractor)
    report = {"checkpoint": os.path.relpath(args.out, REPO_ROOT), "eta": 0.0, "seed": args.eval_seed,
              "confidence_threshold": CONFIDENCE, "schedules": {}}
    for k, (skip_type, steps) in enumerate(args.eval_schedules):
        t0 = time.time()
        images = sample_uint8(model, args.eval_samples, args.eval_batch, skip_type, steps, args.eval_seed,
                              not args.no_progress)
        row = quality(images, extractor, reference)
        row["sampling_seconds"] = round(time.time() - t0, 1)
        report["schedules"][f"{skip_type}:{steps}"] = row
        print(f"{skip_type}:{steps} ({row['n']} samples, eta 0): confident (>{CONFIDENCE}) "
              f"{100 * row['confident_fraction']:.1f}%, FID {row['FID']:.3f}, IS {row['IS']:.2f}, "
              f"precision {100 * row['precision']:.1f}%, recall {100 * row['recall']:.1f}%, classes "
              f"{row['class_histogram']}", flush=True)
        if k == 0 and args.grid:
            write_grid(args.grid, images)
    if args.eval_json:
        atomic_write_bytes(args.eval_json, (json.dumps(report, indent=1) + "\n").encode())
        print(f"wrote {args.eval_json}", flush=True)
    return report


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ddim.config import load_config

    config = load_config(args.config)
    if args.eval_only:
        from ddim.pipeline import load_pixel_model

        model = load_pixel_model(args.config, args.out)
    else:
        from ldm.data.digits import load_digits_split

        images, _ = load_digits_split("train")  # the held-out split stays unseen
        os.makedirs(args.work_dir, exist_ok=True)
        model, ema, seconds = train(args, config, images)
        if model is None:
            return
        model = export(args, model, ema, seconds, len(images))
    if args.eval_samples > 0 and args.eval_schedules:
        evaluate(args, model)


if __name__ == "__main__":
    cli_main(main)
