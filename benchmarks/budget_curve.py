"""Quality against fine-tuning budget at W2A4 on digits (issue 11): EfficientDM and MPQ-DM at several LoRA lr scales.

One fine-tuning run per method, driven through the numbered scripts as a user would (01 once, 02, then 03 with
``--epochs E --stop_after_epoch P`` for each evaluation point P; 03 resumes from its own finetune_state.pt). At each
point the resume state is copied to snapshots/epoch_P.pt and evaluated from that copy: the student is rebuilt from
naive.pt plus the snapshot's trainable tensors, samples 1,000 digits (DDIM 20, eta 0, CFG 3, seed 0: the FP samples'
noise) and is scored by the digits CNN (FID, FID to FP, conditional accuracy, PSNR to FP, ...), together with the
fraction of integer weight codes clamp(round(W'·s/Δ) + round(z), 0, 2^b − 1) (W' with LoRA merged, every quantized
layer) that differ from the naive stage's. Point 0 is the naive model.

  python benchmarks/budget_curve.py                       # 800 epochs (the paper's 16,000 iterations), 5 runs
  python benchmarks/budget_curve.py --epochs 50 --points 0 10 50 --out_dir runs/budget50 --md runs/budget50/t.md
  python benchmarks/budget_curve.py --report_only           # the table from the points finished so far

Every finished point is a JSON in <out_dir>/<method>/points/ and is skipped by a re-run of the same command; the
scripts' output goes to <out_dir>/<method>/log.txt. Methods run --jobs at a time, one thread each.
"""
import argparse
import copy
import json
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.step_runner import StepRunner  # noqa: E402
from ldm.cli import ArgumentParser, nonneg_int, positive_int  # noqa: E402
from ldm.util import UserError, atomic_write_bytes, cli_main  # noqa: E402

W_BITS, A_BITS = 2, 4
STEPS_PER_EPOCH = 20  # the digits preset trains on the 20-step DDIM schedule: one optimizer step per sampling step
METHODS = {  # name -> (quantization method, LoRA lr scale of 03, label)
    "efficientdm": ("efficientdm", 1.0, "EfficientDM"),
    "mpqdm": ("mpqdm", 1.0, "MPQ-DM, paper LoRA lr"),
    "mpqdm-x0.27": ("mpqdm", 0.27, "MPQ-DM, LoRA lr x0.27 (EfficientDM's effective step)"),
    "mpqdm-x0.1": ("mpqdm", 0.1, "MPQ-DM, LoRA lr x0.1"),
    # not in issue 11's list: whether the digits preset's 0.1 suits EfficientDM too at long budgets
    "efficientdm-x0.1": ("efficientdm", 0.1, "EfficientDM, LoRA lr x0.1"),
}
COLUMNS = (("conditional_accuracy", "cond. acc."), ("FID", "FID real"), ("FID_fp", "FID to FP"),
           ("PSNR_fp", "PSNR vs FP (dB)"), ("sFID", "sFID"), ("IS", "IS"))


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=800,
                   help="fine-tuning epochs E of each run (20 iterations each; 800 = the paper's 16,000); the LR "
                        "decays linearly over all E epochs, so a point P < E is a checkpoint of the E-epoch run")
    p.add_argument("--points", type=nonneg_int, nargs="+", default=[0, 50, 200, 800],
                   help="epochs at which the run is evaluated (0 = the naive model); each must be <= --epochs")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="runs to make: " + "; ".join(f"{k}: {v[2]}" for k, v in METHODS.items()))
    p.add_argument("--n_samples", type=positive_int, default=1000,
                   help="images per evaluation, balanced over the 10 digits (multiple of 10)")
    p.add_argument("--batch_size", type=positive_int, default=250, help="images per sampling batch")
    p.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed, shared with the FP samples")
    p.add_argument("--jobs", type=positive_int, default=2, help="methods run in parallel, one CPU thread each")
    p.add_argument("--out_dir", default="runs/digits_budget", help="run directories (one per method) and FP samples")
    p.add_argument("--md", default="results/digits_budget.md", help="Markdown table")
    p.add_argument("--json", default=None, help="JSON records (default: the --md path with .json)")
    p.add_argument("--config", default=None, help="model config of another digits LDM (with --ckpt; default: the "
                                                  "shipped digits model)")
    p.add_argument("--ckpt", default=None, help="checkpoint of that model (with --config)")
    p.add_argument("--quiet", action="store_true", help="do not echo the scripts' commands")
    p.add_argument("--report_only", action="store_true",
                   help="run nothing: write the table from the points already finished under --out_dir, listing the "
                        "ones not measured yet (for a curve whose runs span several sessions)")
    # internal: evaluate one point in a fresh one-thread process (the parallel runs each spawn their own)
    p.add_argument("--eval_point", nargs=2, metavar=("RUN_DIR", "EPOCH"), default=None, help=argparse.SUPPRESS)
    return p


def resolve(args):
    if args.n_samples % 10:
        raise UserError(f"--n_samples must be a multiple of 10 (balanced digits), got {args.n_samples}")
    args.points = sorted(set(args.points))
    if args.points[-1] > args.epochs:
        raise UserError(f"--points {args.points[-1]} lies beyond --epochs {args.epochs}; give points <= --epochs")
    if bool(args.config) != bool(args.ckpt):
        raise UserError("--config and --ckpt must be given together")
    for name in ("config", "ckpt"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
            if not os.path.isfile(getattr(args, name)):
                raise UserError(f"--{name} {getattr(args, name)} does not exist")
    args.out_dir = os.path.abspath(args.out_dir)
    args.methods = list(dict.fromkeys(args.methods))
    return args


def model_flags(args):
    return ["--config", args.config, "--ckpt", args.ckpt] if args.config else ["--preset", "digits"]


def stage_flags(args):
    return ["--preset", "digits"] + (["--config", args.config, "--ckpt", args.ckpt] if args.config else [])


# ------------------------------------------------------------------------------------------- evaluation
def weight_codes(qunet):
    """{layer: integer weight codes} of every quantized (non-special) layer: clamp(round(W'·s/Δ) + round(z))."""
    from quant.quantizer import quantize_int

    codes = {}
    with torch.no_grad():
        for name, layer in qunet.quant_layers():
            if layer.spec.role == "special":
                continue
            w = layer.merged_weight()
            codes[name] = torch.cat([quantize_int(w[:, part], wq.delta.view(wq._view), wq.zero.view(wq._view),
                                                  wq.levels()) for wq, part in layer.weight_quantizers()], dim=1)
    return codes


def codes_changed(before, after):
    """(changed, total) over all layers."""
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    return changed, sum(v.numel() for v in before.values())


def load_fp_model(args):
    from omegaconf import OmegaConf

    from ldm.presets import load_preset_model
    from ldm.util import load_model_from_config

    if args.config:
        return load_model_from_config(OmegaConf.load(args.config), args.ckpt)
    return load_preset_model("digits")


def point_student(model, run_dir, epoch):
    """(naive student, student at ``epoch``): naive.pt rebuilt with quant.api, then the snapshot's trainable
    tensors loaded by parameter name (what 03's resume does); epoch 0 gives the naive student twice."""
    from quant.activation import TemporalActQuantizer
    from quant.api import build_from_meta
    from quant.artifacts import load_artifact

    naive = load_artifact(os.path.join(run_dir, "naive.pt"), what="naive artifact", stage="naive",
                          required=("state_dict",), made_by="quant_scripts/02_quantize_ldm_naive.py")
    student = build_from_meta(copy.deepcopy(model.model.diffusion_model), naive["meta"])
    student.load_state_dict(naive["state_dict"])
    base = copy.deepcopy(student)
    if epoch:
        snap = torch.load(snapshot_path(run_dir, epoch), map_location="cpu", weights_only=True)
        if int(snap["meta"]["epoch"]) != epoch:
            raise UserError(f"{snapshot_path(run_dir, epoch)} holds epoch {snap['meta']['epoch']}, not {epoch}; "
                            "delete it and re-run")
        own = dict(student.named_parameters())
        missing = [n for n in snap["trainable"] if n not in own]
        if missing:
            raise UserError(f"{snapshot_path(run_dir, epoch)} does not fit naive.pt (tensor {missing[0]}); delete "
                            "the run directory and re-run")
        with torch.no_grad():
            for name, value in snap["trainable"].items():
                own[name].copy_(value)
        for m in student.modules():  # as after 03's param_groups: entries may differ per step
            if isinstance(m, TemporalActQuantizer):
                m.make_temporal()
    return base, student, naive["meta"]


def evaluate_point(args):
    from evaluation.digits_report import digits_row_metrics
    from ldm.generate import generate_samples

    torch.set_num_threads(1)
    run_dir, epoch = os.path.abspath(args.eval_point[0]), int(args.eval_point[1])
    model = load_fp_model(args)
    base, student, meta = point_student(model, run_dir, epoch)
    changed, total = codes_changed(weight_codes(base), weight_codes(student))
    del base
    student.eval()
    model.model.diffusion_model = student
    samples = os.path.join(run_dir, "samples", f"epoch_{epoch:05d}.npz")
    generate_samples(model, samples, n_samples=args.n_samples, batch_size=args.batch_size,
                     ddim_steps=len(meta["timesteps"]), eta=0.0, scale=3.0, seed=args.seed, progress=False)
    metrics = digits_row_metrics(samples, fp_samples_path(args))
    record = {"epoch": epoch, "iterations": epoch * STEPS_PER_EPOCH, **{k: float(v) for k, v in metrics.items()},
              "codes_changed": changed / total, "codes_changed_count": changed, "codes_total": total}
    atomic_write_bytes(metrics_path(run_dir, epoch), (json.dumps(record, indent=1) + "\n").encode())


# ------------------------------------------------------------------------------------------- the runs
def snapshot_path(run_dir, epoch):
    return os.path.join(run_dir, "snapshots", f"epoch_{epoch:05d}.pt")


def metrics_path(run_dir, epoch):
    return os.path.join(run_dir, "points", f"epoch_{epoch:05d}.metrics.json")


def point_path(run_dir, epoch):
    return os.path.join(run_dir, "points", f"epoch_{epoch:05d}.json")


def fp_samples_path(args):
    return os.path.join(args.out_dir, "fp", f"samples_{args.n_samples}_seed{args.seed}.npz")


def resume_epoch(run_dir):
    path = os.path.join(run_dir, "finetune_state.pt")
    if not os.path.isfile(path):
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["meta"]["epoch"])


def copy_atomic(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".partial"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def check_run_identity(run_dir, identity):
    """A run directory serves one (method, lr scale, epochs, model); another setting needs another --out_dir."""
    path = os.path.join(run_dir, "run.json")
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
        if old != identity:
            diff = next(k for k in identity if old.get(k) != identity[k])
            raise UserError(f"{run_dir} was made with {diff}={old.get(diff)!r}, not {identity[diff]!r}; use another "
                            "--out_dir or delete it")
    else:
        atomic_write_bytes(path, (json.dumps(identity, indent=1) + "\n").encode())


def shared_naive_point(args, naive_checksum):
    """The epoch-0 record of another method's run with a byte-identical naive.pt (same checksum), if scored."""
    for other in METHODS:
        path = point_path(os.path.join(args.out_dir, other), 0)
        if naive_checksum and os.path.exists(path):
            with open(path) as fh:
                record = json.load(fh)
            if record.get("naive_checksum") == naive_checksum and "shared_with" not in record:
                return record
    return None


def run_method(name, args, runner, calib):
    method, lr_scale, label = METHODS[name]
    run_dir = os.path.join(args.out_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    check_run_identity(run_dir, {"method": method, "lora_lr_scale": lr_scale, "epochs": args.epochs,
                                 "w_bits": W_BITS, "a_bits": A_BITS, "config": args.config, "ckpt": args.ckpt})
    if not os.path.exists(os.path.join(run_dir, "calib.pt")):
        try:
            os.link(calib, os.path.join(run_dir, "calib.pt"))
        except OSError:  # another file system
            copy_atomic(calib, os.path.join(run_dir, "calib.pt"))
    common = [*stage_flags(args), "--run_dir", run_dir, "--threads", 1, "--no_progress"]
    if not os.path.exists(os.path.join(run_dir, "naive.pt")):
        runner(run_dir, "quant_scripts/02_quantize_ldm_naive.py", *common, "--method", method,
               "--n_bits_w", W_BITS, "--n_bits_a", A_BITS)
    from quant.artifacts import read_artifact_checksum

    naive_checksum = read_artifact_checksum(os.path.join(run_dir, "naive.pt"))
    records, previous = [], 0
    for epoch in args.points:
        if epoch == 0 and not os.path.exists(point_path(run_dir, 0)):
            shared = shared_naive_point(args, naive_checksum)
            if shared is not None:  # the same naive.pt (e.g. MPQ-DM at another lr) is already scored
                record = {**shared, "method": name, "label": label, "shared_with": shared["method"],
                          "eval_seconds": 0.0}
                atomic_write_bytes(point_path(run_dir, 0), (json.dumps(record, indent=1) + "\n").encode())
        if os.path.exists(point_path(run_dir, epoch)):
            with open(point_path(run_dir, epoch)) as fh:
                records.append(json.load(fh))
            previous = epoch
            continue
        timing = {"train_seconds": 0.0, "from_epoch": previous}
        if epoch:
            timing_path = snapshot_path(run_dir, epoch) + ".json"
            if not os.path.exists(snapshot_path(run_dir, epoch)):
                if resume_epoch(run_dir) > epoch:
                    raise UserError(f"{run_dir}/finetune_state.pt is past epoch {epoch} but its snapshot is missing; "
                                    "delete the run directory to start over")
                seconds, cpu = runner.timed(run_dir, "quant_scripts/03_train_mpqdm.py", *common, "--epochs",
                                            args.epochs, "--stop_after_epoch", epoch, "--lora_lr_scale", lr_scale)
                if resume_epoch(run_dir) != epoch:
                    raise UserError(f"quant_scripts/03 did not stop at epoch {epoch}; see {run_dir}/log.txt")
                timing = {"train_seconds": seconds, "train_cpu_seconds": cpu, "from_epoch": previous}
                atomic_write_bytes(timing_path, json.dumps(timing).encode())
                copy_atomic(os.path.join(run_dir, "finetune_state.pt"), snapshot_path(run_dir, epoch))
            elif os.path.exists(timing_path):
                with open(timing_path) as fh:
                    timing = json.load(fh)
        eval_seconds = runner(run_dir, "benchmarks/budget_curve.py", "--eval_point", run_dir, epoch,
                              "--n_samples", args.n_samples, "--batch_size", args.batch_size, "--seed", args.seed,
                              "--out_dir", args.out_dir, *(["--config", args.config, "--ckpt", args.ckpt]
                                                           if args.config else []))
        with open(metrics_path(run_dir, epoch)) as fh:
            record = {"method": name, "label": label, **json.load(fh), **timing, "eval_seconds": eval_seconds,
                      "naive_checksum": naive_checksum}
        atomic_write_bytes(point_path(run_dir, epoch), (json.dumps(record, indent=1) + "\n").encode())
        records.append(record)
        span = epoch - timing["from_epoch"]
        per_epoch = (f", {timing['train_seconds'] / span:.1f} s/epoch wall, "
                     f"{timing.get('train_cpu_seconds', float('nan')) / span:.1f} CPU s/epoch"
                     if span > 0 and timing["train_seconds"] else "")
        print(f"[{name}] epoch {epoch}/{args.epochs}: acc {100 * record['conditional_accuracy']:.1f}% FID "
              f"{record['FID']:.3f} FID-FP {record['FID_fp']:.3f} PSNR {record['PSNR_fp']:.2f} codes changed "
              f"{100 * record['codes_changed']:.3f}% (train {timing['train_seconds']:.0f} s{per_epoch}, eval "
              f"{eval_seconds:.0f} s)", flush=True)
        previous = epoch
    return records


# ------------------------------------------------------------------------------------------- report
def omq_summary(args):
    """(layers with m > 0, layers) of the MPQ-DM naive stage on this model, or None without an MPQ-DM run."""
    from quant.artifacts import load_artifact

    for name in args.methods:
        path = os.path.join(args.out_dir, name, "naive.pt")
        if METHODS[name][0] == "mpqdm" and os.path.exists(path):
            choice = load_artifact(path, what="naive artifact", verify=False)["meta"].get("omq_choice", {})
            return sum(int(c.get("m", 0)) > 0 for c in choice.values()), len(choice)
    return None


def reading(records, args):
    last = args.points[-1]
    final = {r["method"]: r for r in records if r["epoch"] == last}
    lines = []
    if "efficientdm" in final and "mpqdm" in final:
        e, m = final["efficientdm"], final["mpqdm"]
        verdict = "beats" if m["FID"] < e["FID"] and m["conditional_accuracy"] >= e["conditional_accuracy"] else \
            "does not beat"
        lines.append(f"- At epoch {last} ({last * STEPS_PER_EPOCH:,} iterations) MPQ-DM with the paper's LoRA lr "
                     f"{verdict} EfficientDM: FID {m['FID']:.3f} vs {e['FID']:.3f} "
                     f"({100 * (m['FID'] / e['FID'] - 1):+.0f}%), accuracy {100 * m['conditional_accuracy']:.1f}% vs "
                     f"{100 * e['conditional_accuracy']:.1f}%.")
    if final:
        best = min(final.values(), key=lambda r: r["FID"])
        lines.append(f"- Lowest FID at epoch {last}: {best['label']} ({best['FID']:.3f}).")
    reached = [max(r["epoch"] for r in records if r["method"] == m) for m in {r["method"] for r in records}]
    common = min(reached) if reached else None
    if common is not None and common != last:   # some runs are not finished: compare all at their common point
        ranked = sorted((r for r in records if r["epoch"] == common), key=lambda r: r["FID"])
        lines.append(f"- At epoch {common}, the last point every run reached: " + ", ".join(
            f"{r['label']} FID {r['FID']:.3f} ({100 * r['conditional_accuracy']:.1f}%)" for r in ranked) + ".")
    omq = omq_summary(args)
    if omq:
        lines.append(f"- OMQ on this model (W{W_BITS} naive stage of the MPQ-DM run): m > 0 in {omq[0]} of {omq[1]} "
                     "quantized layers.")
    return lines


def finished_points(args):
    """(records of every finished point of args.methods at args.points, [(method, epoch) not finished])."""
    records, missing = [], []
    for name in args.methods:
        for epoch in args.points:
            path = point_path(os.path.join(args.out_dir, name), epoch)
            if os.path.exists(path):
                with open(path) as fh:
                    records.append(json.load(fh))
            else:
                missing.append((name, epoch))
    return records, missing


def write_report(records, args, command, wall, missing=()):
    head = ["method", "epoch", "iterations"] + [c[1] for c in COLUMNS] + ["codes changed"]
    md = ["# Digits: quality against fine-tuning budget at W2A4", "", "Command:", "", "```", command, "```", "",
          f"Settings: {'digits LDM-4 (models/ldm/digits-ldm-vq-4)' if not args.config else args.ckpt}; one "
          f"{args.epochs}-epoch fine-tuning run per method (x {STEPS_PER_EPOCH} iterations, digits preset of "
          f"quant_scripts, LR decaying linearly over all {args.epochs} epochs), evaluated from the resume checkpoint "
          f"at each point; epoch 0 = the naive stage. Samples: {args.n_samples} images, DDIM 20, eta 0, CFG 3, seed "
          f"{args.seed}; digits CNN metrics, FID against the 1,437 training digits, FID-FP and PSNR against the FP "
          "samples from the same noise. Codes changed: fraction of integer weight codes "
          "clamp(round(W'·s/Δ) + round(z), 0, 2^b−1) of all quantized layers (LoRA merged) that differ from the "
          "naive stage's.", "",
          (f"Wall time of the command that wrote this: {wall:.0f} s with --jobs {args.jobs} (re-runs skip finished "
           "points; a shared 2-core machine, so times are noisy)." if not args.report_only else
           "Assembled with --report_only from the points finished so far; each run's own times are in the second "
           "table (runs two at a time, one thread each, on a shared 2-core machine, so times are noisy)."), "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    from evaluation.digits_report import format_metric
    for r in records:
        cells = [r["label"], str(r["epoch"]), f"{r['iterations']:,}"] + [format_metric(k, r[k]) for k, _ in COLUMNS]
        md.append("| " + " | ".join(cells + [f"{100 * r['codes_changed']:.3f}%"]) + " |")
    md += ["", "| method | fine-tuning wall s | evaluation wall s | method wall s | wall s per epoch | "
           "CPU s per epoch (1 thread) |", "|---|---|---|---|---|---|"]
    for name in args.methods:
        rs = [r for r in records if r["method"] == name]
        train, evaluation = sum(r["train_seconds"] for r in rs), sum(r["eval_seconds"] for r in rs)
        epochs = sum(r["epoch"] - r["from_epoch"] for r in rs if r["train_seconds"])
        timed = [r for r in rs if r.get("train_cpu_seconds")]
        cpu_epochs = sum(r["epoch"] - r["from_epoch"] for r in timed)
        cpu = f"{sum(r['train_cpu_seconds'] for r in timed) / cpu_epochs:.2f}" if cpu_epochs else "–"
        wall = f"{train / epochs:.2f}" if epochs else "–"
        md.append(f"| {METHODS[name][2]} | {train:.0f} | {evaluation:.0f} | {train + evaluation:.0f} | {wall} | "
                  f"{cpu} |")
    if missing:
        by_method = {}
        for name, epoch in missing:
            by_method.setdefault(METHODS[name][2], []).append(str(epoch))
        md += ["", "Not measured yet (the same command without --report_only runs them, resuming finished points): "
               + "; ".join(f"{label}: epoch {', '.join(e)}" for label, e in by_method.items()) + "."]
    md += ["", "Reading (computed from the table):", ""] + reading(records, args)
    text = "\n".join(md) + "\n"
    md_path = args.md if os.path.isabs(args.md) else os.path.join(REPO, args.md)
    json_path = args.json or os.path.splitext(md_path)[0] + ".json"
    atomic_write_bytes(md_path, text.encode())
    atomic_write_bytes(json_path, (json.dumps({"command": command, "wall_seconds": wall, "epochs": args.epochs,
                                               "points": args.points, "records": records}, indent=1) + "\n").encode())
    print(text)
    print(f"table: {md_path}  records: {json_path}")


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    if args.eval_point:
        return evaluate_point(args)
    command = "python benchmarks/budget_curve.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.report_only:
        records, missing = finished_points(args)
        if not records:
            raise UserError(f"no finished points under {args.out_dir}; run the command without --report_only first")
        write_report(records, args, command, 0.0, missing)
        return records
    runner = StepRunner(args.quiet)
    started = time.time()
    calib_dir = os.path.join(args.out_dir, "calib")
    calib = os.path.join(calib_dir, "calib.pt")
    if not os.path.exists(calib):
        print("[01] calibration trajectories", flush=True)
        runner(calib_dir, "quant_scripts/01_collect_input_4_calib.py", *stage_flags(args), "--run_dir", calib_dir,
               "--threads", 1, "--no_progress")
    if not os.path.exists(fp_samples_path(args)):
        print("[fp] FP samples", flush=True)
        runner(os.path.join(args.out_dir, "fp"), "scripts/sample_diffusion.py", *model_flags(args), "--ddim_steps", 20,
               "--eta", 0.0, "--scale", 3.0, "--n_samples", args.n_samples, "--batch_size", args.batch_size,
               "--seed", args.seed, "--out", fp_samples_path(args), "--no_progress")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_method, name, args, runner, calib) for name in args.methods]
        records = [r for fut in futures for r in fut.result()]
    write_report(records, args, command, time.time() - started)
    return records


if __name__ == "__main__":
    cli_main(main)
