"""Does a digits LDM look trained? Weight and activation statistics under the MPQ-DM layer policy (issue 11).

For each checkpoint (NAME=PATH; a config.yaml next to the checkpoint overrides the digits config):
- FP quality exactly as the shipped model is scored: 1,000 samples (100 per digit), DDIM 20, eta 0, CFG 3, seed 0;
  conditional accuracy by the digits CNN, FID/sFID/IS against the 1,437 training digits;
- calibration tuples by quant_scripts/01 (digits preset) and the 32 seeded tuples of stage 02;
- per quantized layer (quant.policy "quant" role: what OMQ sees), from the real naive stage at W2A4
  (quantize_ + calibrate, MPQ-DM): the per-output-channel Pearson kurtosis of the raw W and of the smoothed W·s
  (s from the layer's real, upstream-quantized input), and the spread of the input's per-channel ranges
  max_j max|X_j| / median_j max|X_j|;
- the split m OMQ picks in every layer at W2A4, W3A4 and W4A4 (the naive stage's log).
Reference points: uniform rows have kurtosis 1.8, Gaussian rows 3.

  python benchmarks/weight_stats.py shipped=models/ldm/digits-ldm-vq-4/model.ckpt \
      long-20k=runs/digits_candidates/long-20k/model.ckpt --md results/digits_weight_stats.md

Writes the Markdown table (command above it) and a JSON with per-layer detail; sample files and calibration data are
kept under --work_dir/<NAME>/ and reused by a re-run.
"""
import argparse
import copy
import json
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.cli import ArgumentParser, nonneg_int, positive_int  # noqa: E402
from ldm.util import UserError, atomic_write_bytes, cli_main  # noqa: E402

DEFAULT_CONFIG = "configs/latent-diffusion/digits-ldm-vq-4.yaml"
OMQ_BITS = (2, 3, 4)
A_BITS = 4
N_CALIB, CALIB_SEED, TRAIN_STEPS = 32, 0, 20  # the digits preset of stage 02


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="NAME=CKPT",
                   help="checkpoints to measure; a config.yaml in the checkpoint's folder is used if present, "
                        f"else {DEFAULT_CONFIG}")
    p.add_argument("--n_samples", type=positive_int, default=1000, help="FP samples per model (multiple of 10)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed (x_T of image i from seed and i)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    p.add_argument("--work_dir", default="runs/weight_stats", help="per-model samples and calibration data")
    p.add_argument("--md", default="results/digits_weight_stats.md", help="Markdown table ('' to skip)")
    p.add_argument("--json", default=None, help="JSON records (default: the --md path with .json)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


def parse_models(items):
    models = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.dirname(os.path.abspath(item))), item
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {path} not found; pass NAME=PATH to an existing model.ckpt")
        config = os.path.join(os.path.dirname(path), "config.yaml")
        models.append((name, path, config if os.path.isfile(config) else os.path.join(REPO, DEFAULT_CONFIG)))
    names = [m[0] for m in models]
    if len(set(names)) != len(names):
        raise UserError("two models share a name; give each one a distinct NAME=PATH")
    return models


# -------------------------------------------------------------------------------------------- statistics
def summary(values):
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "max": float(v.max())}


def channel_range_ratio(x, weight_dim):
    """max_j / median_j of the per-input-channel max|X_j| (channel dim 1 for convs, the last dim for linears)."""
    x = x.detach().abs()
    per_channel = x.amax(dim=(0, 2, 3)) if weight_dim == 4 else x.reshape(-1, x.shape[-1]).amax(dim=0)
    return float(per_channel.max() / per_channel.median().clamp(min=1e-12))


@torch.no_grad()
def naive_stage(unet, w_bits, x, t, context, record_inputs=False):
    """Run the real MPQ-DM naive stage on a copy of ``unet``; {layer: {"m", "cout", [stats]}} for quant layers."""
    from ldm.modules.diffusionmodules.util import make_ddim_timesteps
    from quant.api import make_config, quantize_
    from quant.methods.omq import kurtosis
    from quant.stages.calibrate import calibrate

    timesteps = [int(v) for v in make_ddim_timesteps("uniform", TRAIN_STEPS, 1000, verbose=False)]
    qunet = quantize_(copy.deepcopy(unet), make_config("mpqdm", w_bits=w_bits, a_bits=A_BITS), timesteps)
    ranges, handles = {}, []

    def record(name):
        def hook(module, args):  # returns None: the input passes unchanged
            ranges.setdefault(name, channel_range_ratio(args[0], module.weight.dim()))
        return hook

    if record_inputs:  # registered before calibrate's own hooks; both see the same input
        for name, layer in qunet.quant_layers():
            if layer.spec.role == "quant":
                handles.append(layer.register_forward_pre_hook(record(name)))
    try:
        log = calibrate(qunet, x, t, context)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, layer in qunet.quant_layers():
        if layer.spec.role != "quant":
            continue
        rec = {"m": int(log[name]["m"]), "cout": int(log[name]["cout"])}
        if record_inputs:
            rec.update(shape=list(layer.weight.shape), act_range_ratio=ranges[name],
                       kurtosis_raw=kurtosis(layer.weight).double().tolist(),
                       kurtosis_smoothed=kurtosis(layer.merged_weight()).double().tolist())
        out[name] = rec
    return out


def init_kurtosis(config_path, seed=1):
    """Raw kurtosis of a freshly initialised UNet of this config (rows that are not constant, e.g. zero-init)."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    from quant.methods.omq import kurtosis
    from quant.policy import classify

    torch.manual_seed(seed)
    cfg = OmegaConf.to_container(OmegaConf.load(config_path).model.params.unet_config, resolve=True)
    unet = instantiate_from_config(cfg)
    values = []
    for name, role in classify(unet).items():
        if role == "quant":
            w = unet.get_submodule(name).weight
            rows = w.reshape(w.shape[0], -1)
            keep = rows.std(dim=1) > 0
            values += kurtosis(w)[keep].double().tolist()
    return summary(values) if values else None


# -------------------------------------------------------------------------------------------- per model
def fp_quality(model, samples, n_samples, seed, progress):
    from evaluation.digits_report import digits_row_metrics
    from ldm.generate import generate_samples

    if not os.path.exists(samples):
        generate_samples(model, samples, n_samples=n_samples, batch_size=250, ddim_steps=20, eta=0.0, scale=3.0,
                         seed=seed, progress=progress)
    metrics = digits_row_metrics(samples, samples)
    return {k: metrics[k] for k in ("conditional_accuracy", "FID", "sFID", "IS", "precision", "recall")}


def calibration_batch(name, ckpt, config, run_dir, progress):
    calib = os.path.join(run_dir, "calib.pt")
    if not os.path.exists(calib):
        cmd = [sys.executable, os.path.join(REPO, "quant_scripts/01_collect_input_4_calib.py"), "--preset", "digits",
               "--run_dir", run_dir, "--config", config, "--ckpt", ckpt, "--threads", "1"]
        if not progress:
            cmd.append("--no_progress")
        with open(os.path.join(run_dir, "calib.log"), "a") as log:
            if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO) != 0:
                raise UserError(f"quant_scripts/01 failed for {name}; see {run_dir}/calib.log")
    data = torch.load(calib, map_location="cpu", weights_only=True)
    idx = torch.randperm(int(data["t"].shape[0]), generator=torch.Generator().manual_seed(CALIB_SEED))[:N_CALIB]
    return data["x"][idx], data["t"][idx], data["context"][idx] if "context" in data else None


def measure(name, ckpt, config, args):
    from omegaconf import OmegaConf

    from ldm.util import load_checkpoint, load_model_from_config

    run_dir = os.path.join(args.work_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    model = load_model_from_config(OmegaConf.load(config), ckpt)
    container = load_checkpoint(ckpt)
    training = container.get("training", {})
    unet = model.model.diffusion_model
    rec = {"name": name, "ckpt": os.path.relpath(ckpt, REPO), "config": os.path.relpath(config, REPO),
           "steps": container.get("global_step"), "unet_params": sum(p.numel() for p in unet.parameters()),
           "train_seconds": (training.get("vq_seconds", 0) + training.get("ldm_seconds", 0)) or None,
           "training_args": training.get("args"), "state_dict_sha256": training.get("state_dict_sha256")}
    print(f"[{name}] FP quality ({args.n_samples} samples)", flush=True)
    rec["fp"] = fp_quality(model, os.path.join(run_dir, f"fp_{args.n_samples}_seed{args.seed}.npz"), args.n_samples,
                           args.seed, not args.no_progress)
    x, t, context = calibration_batch(name, ckpt, config, run_dir, not args.no_progress)
    layers = {}
    for b in OMQ_BITS:
        print(f"[{name}] naive MPQ-DM stage at W{b}A{A_BITS}", flush=True)
        for lname, lrec in naive_stage(unet, b, x, t, context, record_inputs=b == OMQ_BITS[0]).items():
            layers.setdefault(lname, {}).update({k: v for k, v in lrec.items() if k != "m"}, **{f"m_w{b}": lrec["m"]})
    rec["n_layers"] = len(layers)
    rec["kurtosis_raw"] = summary([k for lr in layers.values() for k in lr["kurtosis_raw"]])
    rec["kurtosis_smoothed"] = summary([k for lr in layers.values() for k in lr["kurtosis_smoothed"]])
    rec["act_range_ratio"] = summary([lr["act_range_ratio"] for lr in layers.values()])
    rec["omq_layers_m_pos"] = {f"w{b}": sum(lr[f"m_w{b}"] > 0 for lr in layers.values()) for b in OMQ_BITS}
    rec["layers"] = {n: {**{k: v for k, v in lr.items() if not k.startswith("kurtosis")},
                         "kurtosis_raw": summary(lr["kurtosis_raw"]),
                         "kurtosis_smoothed": summary(lr["kurtosis_smoothed"])} for n, lr in layers.items()}
    print(f"[{name}] acc {rec['fp']['conditional_accuracy']:.3f} FID {rec['fp']['FID']:.3f} "
          f"kurtosis W·s median/p90/max {fmt3(rec['kurtosis_smoothed'])} raw {fmt3(rec['kurtosis_raw'])} "
          f"m>0 {rec['omq_layers_m_pos']}", flush=True)
    return rec


# -------------------------------------------------------------------------------------------- table
def fmt3(s):
    return "/".join(f"{s[k]:.2f}" for k in ("median", "p90", "max")) if s else "–"


def table(records, init, command, n_samples):
    head = ["candidate", "LDM steps", "UNet params", "train s (recorded wall)", "cond. acc.", "FID",
            "κ(W·s) med/p90/max",
            "κ(W) med/p90/max", "act range ratio (median layer)", "OMQ m>0 W2/W3/W4"]
    lines = ["# Digits LDM: weight statistics under the MPQ-DM layer policy", "", "Command:", "", "```", command,
             "```", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        n = r["n_layers"]
        m = "/".join(f"{r['omq_layers_m_pos'][f'w{b}']}" for b in OMQ_BITS) + f" of {n}"
        cells = [r["name"], str(r["steps"]), f"{r['unet_params']:,}",
                 "–" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}",
                 f"{100 * r['fp']['conditional_accuracy']:.1f}%", f"{r['fp']['FID']:.3f}", fmt3(r["kurtosis_smoothed"]),
                 fmt3(r["kurtosis_raw"]), f"{r['act_range_ratio']['median']:.2f}", m]
        lines.append("| " + " | ".join(cells) + " |")
    if init:
        lines += ["", f"Fresh initialisation of the shipped config (seeded, non-constant rows): κ(W) med/p90/max "
                      f"{fmt3(init)}; uniform rows give 1.8, Gaussian rows 3."]
    lines += ["", "κ: per-output-channel Pearson kurtosis pooled over every channel of the quantized layers (the "
                  "MPQ-DM policy's \"quant\" role); W·s: the smoothed weight OMQ ranks, s from the layer's real input "
                  "in the W2A4 naive stage (32 seeded calibration tuples of quant_scripts/01's digits trajectories). "
                  "act range ratio: per layer, the largest over the median input-channel max|X_j|; median over "
                  "layers. OMQ m>0: layers where the naive stage's output-MSE search chose a nonzero split. FP "
                  f"quality: {n_samples:,} samples, DDIM 20, eta 0, CFG 3, seed 0, digits CNN, FID against the 1,437 "
                  "training digits. Training seconds: VQ + LDM wall time recorded in the checkpoint, on a shared "
                  "2-core machine (noisy; compare step costs, not these)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.n_samples % 10:
        raise UserError(f"--n_samples must be a multiple of 10 (balanced digits), got {args.n_samples}")
    torch.set_num_threads(args.threads)
    models = parse_models(args.models)
    args.work_dir = os.path.join(REPO, args.work_dir) if not os.path.isabs(args.work_dir) else args.work_dir
    command = "python benchmarks/weight_stats.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    records = [measure(name, ckpt, config, args) for name, ckpt, config in models]
    init = init_kurtosis(os.path.join(REPO, DEFAULT_CONFIG))
    text = table(records, init, command, args.n_samples)
    print(text)
    if args.md:
        md = args.md if os.path.isabs(args.md) else os.path.join(REPO, args.md)
        out_json = args.json or os.path.splitext(md)[0] + ".json"
        atomic_write_bytes(md, text.encode())
        atomic_write_bytes(out_json, (json.dumps({"command": command, "init_kurtosis_raw": init,
                                                  "models": records}, indent=1) + "\n").encode())
        print(f"wrote {md} and {out_json}")


if __name__ == "__main__":
    cli_main(main)
