#!/usr/bin/env python
"""FP quality of the embedded text-to-image digits model: prompt accuracy (the digits CNN's stand-in for the CLIP
score) and FID / IS / precision / recall against the digits train split (digits CNN features), for the held-out
and the training phrasings, at PLMS 50 and DDIM 20, through scripts/txt2img.py. Writes results/digits_txt2img_fp.json
(+ .md) and a grid (one row per digit, held-out phrasings).

    python benchmarks/digits_txt2img_fp.py                      # the shipped model, CFG 3
    python benchmarks/digits_txt2img_fp.py --scales 1 3 5 7.5 --samplers ddim   # a guidance sweep
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ldm.cli import ArgumentParser, nonneg_float, nonneg_int, positive_int  # noqa: E402
from ldm.util import atomic_write_bytes, cli_main  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = {"plms": ("plms", 50), "ddim": ("ddim", 20)}
SETS = {"digits-heldout": 25, "digits-train": 6}  # samples per prompt: 20 x 25 = 500 and 80 x 6 = 480 images


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/stable-diffusion/digits-txt2img.yaml", help="model config")
    p.add_argument("--ckpt", default="models/ldm/digits-txt2img/model.ckpt", help="model checkpoint")
    p.add_argument("--scales", type=nonneg_float, nargs="+", default=[3.0], help="CFG scales to evaluate")
    p.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=["plms", "ddim"],
                   help="plms = PLMS 50 steps, ddim = DDIM 20 steps (eta 0)")
    p.add_argument("--sets", nargs="+", choices=sorted(SETS), default=sorted(SETS), help="prompt sets")
    p.add_argument("--per_prompt_scale", type=positive_int, default=1,
                   help="multiply the samples per prompt (1: 500 held-out / 480 training-phrasing images)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed")
    p.add_argument("--work_dir", default="runs/digits_txt2img_fp", help="txt2img output folders")
    p.add_argument("--out", default="results/digits_txt2img_fp.json", help="results JSON (a .md is written beside)")
    p.add_argument("--grid", default="results/digits_txt2img_fp_grid.png",
                   help="grid of the first evaluated setting, one row per digit ('' to skip)")
    return p.parse_args(argv)


def digit_grid(path, images, labels, per_row=10):
    from ldm.generate import grid_png

    # evenly spaced over each digit's images, so both held-out phrasings appear in a row
    picks = [np.flatnonzero(labels == d) for d in range(10)]
    grid_png(path, [list(images[idx[np.linspace(0, len(idx) - 1, per_row).round().astype(int)]]) for idx in picks])


def main(argv=None):
    args = parse_args(argv)
    import importlib.util

    from evaluation.evaluate import evaluate_npz, make_extractor

    spec = importlib.util.spec_from_file_location("txt2img", os.path.join(REPO_ROOT, "scripts", "txt2img.py"))
    t2i = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t2i)
    extractor = make_extractor("digits")
    rows, grid_done = [], not args.grid
    for scale in args.scales:
        for sampler in args.samplers:
            name, steps = SAMPLERS[sampler]
            for prompt_set in args.sets:
                n = SETS[prompt_set] * args.per_prompt_scale
                tag = f"{prompt_set}_{name}{steps}_cfg{scale:g}_seed{args.seed}"
                outdir = os.path.join(REPO_ROOT, args.work_dir, tag)
                cmd = ["--config", args.config, "--ckpt", args.ckpt, "--from-file", prompt_set, "--n_samples", str(n),
                       "--sampler", name, "--ddim_steps", str(steps), "--scale", str(scale), "--seed", str(args.seed),
                       "--batch_size", "100", "--outdir", outdir]
                npz = t2i.main(cmd + ["--no_progress"])  # resumes from the PNGs of an earlier identical run
                res = evaluate_npz("digits-train", npz, "digits", extractor_obj=extractor)
                m = res["metrics"]
                row = {"prompt_set": prompt_set, "sampler": name, "steps": steps, "scale": scale, "seed": args.seed,
                       "num_samples": res["num_samples"], "prompt_accuracy": m["conditional_accuracy"],
                       "FID": m["FID"], "sFID": m["sFID"], "IS": m["IS"], "precision": m["precision"],
                       "recall": m["recall"],
                       "command": " ".join(["python scripts/txt2img.py"] + cmd[:-1]
                                           + [os.path.relpath(outdir, REPO_ROOT)])}
                print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
                rows.append(row)
                if not grid_done and prompt_set == "digits-heldout":
                    with np.load(npz) as data:
                        digit_grid(os.path.join(REPO_ROOT, args.grid), data["arr_0"], data["arr_1"])
                    grid_done = True
    out = os.path.join(REPO_ROOT, args.out)
    command = "python benchmarks/digits_txt2img_fp.py " + " ".join(argv or sys.argv[1:])
    atomic_write_bytes(out, json.dumps({"rows": rows, "evaluator": "digits CNN vs digits-train (1,437 images)",
                                        "command": command}, indent=1).encode())
    lines = ["# The digits text-to-image model at full precision", "", f"Command: `{command}`", "",
             "Prompt accuracy and the metrics by the digits CNN against the 1,437 real training digits.", "",
             "| prompts | sampler | CFG | N | prompt acc. | FID | sFID | IS | precision | recall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt_set']} | {r['sampler'].upper()} {r['steps']} | {r['scale']:g} | "
                     f"{r['num_samples']} | {100 * r['prompt_accuracy']:.1f}% | {r['FID']:.3f} | {r['sFID']:.3f} | "
                     f"{r['IS']:.2f} | {100 * r['precision']:.1f}% | {100 * r['recall']:.1f}% |")
    atomic_write_bytes(out[:-5] + ".md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    cli_main(main)
