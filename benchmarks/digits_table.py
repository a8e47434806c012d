"""The digits results tables: FP, naive PTQ, Q-Diffusion, EfficientDM, MPQ-DM (+ MPQ-DM+ and ablations) on the
embedded models.

Runs the numbered scripts exactly as a user would (01 once, then 02 -> 03 -> 04 per row; a post-training row such
as Q-Diffusion's is 02 -> 04, its reconstruction timed as its training cost), scores every sample file
with the digits CNN, and writes a Markdown + JSON table. Every step skips work whose artifact already exists, so a
killed run continues where it stopped when re-run with the same arguments.

  python benchmarks/digits_table.py                   # full table -> results/digits.md, results/digits.json
  python benchmarks/digits_table.py --profile demo    # what `make demo` runs: W2A4 MPQ-DM vs EfficientDM vs FP
  python benchmarks/digits_table.py --profile text    # the text-to-image model -> results/digits_txt2img.md/json
  python benchmarks/digits_table.py --profile demo-text   # `make demo`'s text part: W4A8 and W2A4
  python benchmarks/digits_table.py --profile pixel   # the pixel-space DDIM miniature -> results/digits_pixel.md/json

Text profiles (preset digits-txt2img) sample the 20 held-out prompts (2 phrasings x 10 digits, never seen in
training) with the preset's PLMS 50 / CFG 3; "cond. acc." is then the prompt accuracy: the digits CNN's class
against the digit the prompt names.
"""
import argparse
import fnmatch
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.step_runner import StepRunner  # noqa: E402
from evaluation.digits_report import DIGITS_METRIC_COLUMNS, digits_row_metrics, format_metric  # noqa: E402
from ldm.cli import ArgumentParser, nonneg_int, positive_int  # noqa: E402
from ldm.util import UserError, atomic_write_bytes, cli_main  # noqa: E402

# One row = one run directory. `stage` naive samples naive.pt of `source` (no fine-tuning of its own).
FP_ROW = dict(name="fp", label="FP", method="fp", w=32, a=32)
MPQDM_PLUS_W2A4 = dict(name="mpqdm+-w2a4", label="MPQ-DM+", method="mpqdm+", w=2, a=4)


# The table measures the papers' recipe unless a row says otherwise: the paper's LoRA lr, named explicitly because
# the digits preset's own default is 0.1x of it (results/digits_budget.md)
PAPER_LR = ["--lora_lr_scale", "1.0"]


def bit_rows(bits, naive=True):
    """Per (W, A): [naive PTQ (EfficientDM's naive stage),] EfficientDM, MPQ-DM. MPQ-DM has no 8-bit row: its
    mixed-precision groups are {b-1, b, b+1} bits, and 9-bit weights are outside the toolkit's 1..8."""
    rows = []
    for w, a in bits:
        if naive:
            rows.append(dict(name=f"naive-w{w}a{a}", label="naive PTQ", method="efficientdm", w=w, a=a, stage="naive",
                             source=f"efficientdm-w{w}a{a}"))
        rows.append(dict(name=f"efficientdm-w{w}a{a}", label="EfficientDM", method="efficientdm", w=w, a=a))
        if w < 8:
            rows.append(dict(name=f"mpqdm-w{w}a{a}", label="MPQ-DM", method="mpqdm", w=w, a=a))
    return rows


def ptq_rows(bits, method="qdiffusion", label="Q-Diffusion", suffix="", flags=(), calib="trajectory"):
    """A post-training method's rows: calibrated and reconstructed by 02 with its preset (plus ``flags``), sampled by
    04; ``suffix`` tells apart rows of one method with other flags, ``calib`` names their calibration data
    (CALIBRATIONS)."""
    return [dict(name=f"{method}{suffix}-w{w}a{a}", label=label, method=method, w=w, a=a, stage="ptq",
                 flags=list(flags), calib=calib) for w, a in bits]


# Calibration data per preset and recipe (one 01 run each, shared by the rows naming it): the preset's recorded
# trajectories, or TFMQ-DM's (PEERS.md §3.4): a fresh FP run per step on the sampling schedule its per-step sets are
# keyed by, or EDA-DM's (PEERS.md §2.1): N/B batches of fresh noise on the sampling schedule, TDAC taking one sample
# per trajectory, so N = 128 needs 8 batches of 16. The digits preset samples DDIM 20, eta 0, CFG 3.0 (its 01
# default records 50-step trajectories); the pixel preset's 01 default already is its sampling schedule (quad 20,
# eta 0, no guidance, 16 per batch)
_DIGITS_SCHEDULE = ["--calib_steps", 20, "--calib_eta", 0.0, "--calib_scale", 3.0]
CALIBRATIONS = {
    "digits": {"trajectory": [], "tfmqdm": ["--calib_data", "fresh_per_step", *_DIGITS_SCHEDULE],
               "edadm": [*_DIGITS_SCHEDULE, "--calib_batch", 16, "--calib_batches", 8]},
    "digits-pixel": {"trajectory": [], "tfmqdm": ["--calib_data", "fresh_per_step"], "edadm": ["--calib_batches", 8]},
    "digits-txt2img": {"trajectory": []},
}

PTQ_BITS = [(8, 8), (4, 8), (4, 4), (3, 4), (2, 4)]
# Q-Diffusion at its own settings (W8A8, W4A8) and where the MPQ-DM paper says PTQ collapses (W4A4 and below)
QDIFFUSION_ROWS = ptq_rows(PTQ_BITS)
# TFMQ-DM with per-step sets on the time-embedding block only (the paper) and on every quantizer (the released code)
TFMQDM_ROWS = (ptq_rows(PTQ_BITS, "tfmqdm", "TFMQ-DM (FSC paper)", "-paper", ["--fsc", "paper"], "tfmqdm")
               + ptq_rows(PTQ_BITS, "tfmqdm", "TFMQ-DM (FSC released)", "-released", ["--fsc", "released"], "tfmqdm"))
# EDA-DM with its digits preset (TDAC over 128 trajectories, FBR with QDrop, the cin256-v2 lr / add_loss recipe)
EDADM_ROWS = ptq_rows(PTQ_BITS, "edadm", "EDA-DM", calib="edadm")
MAIN_ROWS = ([FP_ROW] + QDIFFUSION_ROWS + TFMQDM_ROWS + EDADM_ROWS + bit_rows([(4, 8), (4, 4), (3, 4), (2, 4)])
             + [MPQDM_PLUS_W2A4])
_TFMQ_W4A8 = next(r for r in TFMQDM_ROWS if r["name"] == "tfmqdm-paper-w4a8")

ABLATION_ROWS = [
    dict(name="efficientdm-w2a4", label="EfficientDM", method="efficientdm", w=2, a=4),
    dict(name="abl-omq-only-w2a4", label="MPQ-DM, TRD off (+OMQ)", method="mpqdm", w=2, a=4,
         flags=["--trd_mode", "off"]),
    dict(name="abl-trd-only-w2a4", label="MPQ-DM, OMQ off (+TRD)", method="mpqdm", w=2, a=4, flags=["--omq", "off"]),
    dict(name="mpqdm-w2a4", label="MPQ-DM (OMQ + TRD, paper)", method="mpqdm", w=2, a=4),
    dict(name="abl-trd-released-w2a4", label="MPQ-DM, TRD released (detached)", method="mpqdm", w=2, a=4,
         flags=["--trd_mode", "released"]),
    dict(name="abl-omq-released-w2a4", label="MPQ-DM, OMQ released set {0,10%}", method="mpqdm", w=2, a=4,
         flags=["--omq_candidates", "released"]),
    dict(name="abl-mpqdm-naive-w2a4", label="MPQ-DM naive (OMQ, no fine-tuning)", method="mpqdm", w=2, a=4,
         stage="naive", source="mpqdm-w2a4"),
    # the paper's LoRA lr (avg_Δ/2500, Δ in the smoothed domain) over-steps on this model: 0.1x of it
    dict(name="abl-efficientdm-lora01-w2a4", label="EfficientDM, LoRA lr x0.1", method="efficientdm", w=2, a=4,
         ft_flags=["--lora_lr_scale", "0.1"]),
    dict(name="abl-mpqdm-lora01-w2a4", label="MPQ-DM, LoRA lr x0.1", method="mpqdm", w=2, a=4,
         ft_flags=["--lora_lr_scale", "0.1"]),
    # TFMQ-DM's own ablation (its paper: TIAR and FSC each lower FID at W4A8), against its full W4A8 row
    _TFMQ_W4A8,
    *ptq_rows([(4, 8)], "tfmqdm", "TFMQ-DM, TIAR off (FSC paper)", "-abl-tiar-off",
              ["--fsc", "paper", "--tiar", "off"], "tfmqdm"),
    *ptq_rows([(4, 8)], "tfmqdm", "TFMQ-DM, FSC off (TIAR on)", "-abl-fsc-off", ["--fsc", "off"], "tfmqdm"),
    # EDA-DM's components one at a time, against its full W4A8 row
    next(r for r in EDADM_ROWS if r["name"] == "edadm-w4a8"),
    *ptq_rows([(4, 8)], "edadm", "EDA-DM, TDAC off (uniform steps)", "-abl-tdac-off", ["--tdac", "off"], "edadm"),
    *ptq_rows([(4, 8)], "edadm", "EDA-DM, FBR layer loss off", "-abl-layer-loss-off", ["--add_loss", 0], "edadm"),
    *ptq_rows([(4, 8)], "edadm", "EDA-DM, QDrop off", "-abl-qdrop-off", ["--qdrop", 0], "edadm"),
]

_BY_NAME = {r["name"]: r for r in MAIN_ROWS + ABLATION_ROWS}
DEMO_ROWS = [_BY_NAME[n] for n in ("fp", "efficientdm-w2a4", "mpqdm-w2a4", "abl-mpqdm-lora01-w2a4")]

TEXT_ROWS = [FP_ROW] + bit_rows([(4, 8), (4, 4), (2, 4)], naive=False) + [MPQDM_PLUS_W2A4]
_TEXT_BY_NAME = {r["name"]: r for r in TEXT_ROWS}
TEXT_DEMO_ROWS = [_TEXT_BY_NAME[n] for n in ("fp", "efficientdm-w4a8", "mpqdm-w4a8", "efficientdm-w2a4",
                                             "mpqdm-w2a4")]
TEXT_PROMPTS = 20  # the digits-heldout prompt set: 2 phrasings x 10 digits
PIXEL_BITS = [(8, 8), (4, 8), (4, 4), (2, 4)]
PIXEL_ROWS = ([FP_ROW] + bit_rows(PIXEL_BITS) + ptq_rows(PIXEL_BITS)
              + ptq_rows(PIXEL_BITS, "tfmqdm", "TFMQ-DM (FSC paper)", "-paper", ["--fsc", "paper"], "tfmqdm")
              # EDA-DM's FBR runs 300 iterations per unit on the 32x32 level's blocks at ~1.4 s each (2 jobs): ~30
              # CPU-minutes a row
              + ptq_rows(PIXEL_BITS, "edadm", "EDA-DM", calib="edadm"))

PROFILES = {
    # the results table: over an hour on 2 CPU cores with --jobs 2 (15 fine-tuning runs of 800 iterations, 25
    # post-training runs of 1-5 minutes each)
    "full": dict(rows=MAIN_ROWS, ablation=ABLATION_ROWS, epochs=40, n_samples=1000, out_dir="runs/digits_table",
                 md="results/digits.md", json="results/digits.json"),
    # make demo: the digits preset's 16-epoch budget (320 iterations), a few minutes
    "demo": dict(rows=DEMO_ROWS, ablation=[], epochs=16, n_samples=1000, out_dir="runs/demo",
                 md="runs/demo/table.md", json="runs/demo/table.json"),
    # the text-to-image model at its preset's 8-epoch budget (400 iterations); PLMS 50 with CFG makes sampling the
    # larger part, so 200 images (10 per held-out prompt)
    "text": dict(preset="digits-txt2img", rows=TEXT_ROWS, ablation=[], epochs=8, n_samples=200,
                 out_dir="runs/digits_txt2img_table", md="results/digits_txt2img.md",
                 json="results/digits_txt2img.json"),
    # the pixel-space DDIM miniature (the CIFAR-10 protocol in miniature: quad skip, 20 steps, no guidance)
    "pixel": dict(preset="digits-pixel", rows=PIXEL_ROWS, ablation=[], epochs=16, n_samples=300,
                  out_dir="runs/digits_pixel_table", md="results/digits_pixel.md", json="results/digits_pixel.json"),
    "demo-text": dict(preset="digits-txt2img", rows=TEXT_DEMO_ROWS, ablation=[], epochs=4, n_samples=100,
                      out_dir="runs/demo_text", md="runs/demo_text/table.md", json="runs/demo_text/table.json"),
}


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="full",
                   help="full: every row of the results table; demo: FP, EfficientDM and MPQ-DM (paper LoRA lr "
                        "and x0.1) at W2A4 only; pixel: the pixel-space DDIM miniature's table (FP, naive PTQ, "
                        "EfficientDM, MPQ-DM, Q-Diffusion, TFMQ-DM, EDA-DM at W8A8, W4A8, W4A4, W2A4); text: the "
                        "text-to-image model's table (FP, EfficientDM, MPQ-DM at W4A8, W4A4, W2A4, MPQ-DM+ at W2A4); "
                        "demo-text: its W4A8 and W2A4 rows")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="fine-tuning epochs per run (one sampling trajectory each: 20 optimizer steps for digits, 50 "
                        "for text; default: the profile's)")
    p.add_argument("--n_samples", type=positive_int, default=None,
                   help="images per row, balanced over the 10 digits (text: over the 20 held-out prompts; default: "
                        "the profile's)")
    p.add_argument("--batch_size", type=positive_int, default=250, help="images per sampling batch")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="sampling seed; every row uses the same per-image noise, so PSNR pairs images")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="runs executed in parallel, each on one CPU thread (2 fits a 2-core machine)")
    p.add_argument("--out_dir", default=None, help="where the run directories go (default runs/digits_table)")
    p.add_argument("--md", default=None, help="Markdown table path (default results/digits.md)")
    p.add_argument("--json", default=None, help="JSON records path (default results/digits.json)")
    p.add_argument("--rows", nargs="+", metavar="GLOB", default=None,
                   help="measure only the rows whose names match these patterns (e.g. 'edadm*'; the FP row is "
                        "always re-drawn, as every row's FID-to-FP reference) and keep every other row's record, "
                        "with the command that made it, from the existing --json table")
    p.add_argument("--quiet", action="store_true", help="do not echo the scripts' commands")
    return p


def select_rows(rows, patterns):
    """The rows named by ``patterns`` plus the FP row; a pattern matching nothing is an error (a typo would
    otherwise measure nothing and rewrite the table)."""
    names = [r["name"] for r in rows]
    for pat in patterns:
        if not fnmatch.filter(names, pat):
            raise UserError(f"--rows {pat!r} matches no row of this profile; its rows are: {', '.join(names)}")
    return [r for r in rows if r["method"] == "fp" or any(fnmatch.fnmatch(r["name"], p) for p in patterns)]


def kept_records(json_path, names):
    """The records of the rows not re-measured, from the table at ``json_path``: each must be there and name the
    command that made it."""
    if not os.path.exists(json_path):
        raise UserError(f"--rows keeps the other rows from {json_path}, which does not exist; run the whole table "
                        "first (without --rows)")
    try:
        old = {r["name"]: r for r in json.load(open(json_path))}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{json_path} is not a results table written by this script ({exc})") from None
    missing = [n for n in names if n not in old or "command" not in old[n]]
    if missing:
        raise UserError(f"{json_path} lacks these rows (or the command that made them): {', '.join(missing)}; run "
                        "the whole table (without --rows)")
    return {n: old[n] for n in names}


def run_row(row, args, runner, calib):
    """Produce the row's samples.npz (and finetuned.pt); returns the timing record of its fine-tuning, or for a
    post-training row of its reconstruction ({} if neither)."""
    run_dir = os.path.join(args.out_dir, row["name"])
    samples = os.path.join(run_dir, "samples.npz")
    count = (["--images_per_prompt", args.n_samples // TEXT_PROMPTS] if args.preset == "digits-txt2img"
             else ["--n_samples", args.n_samples])
    sample_args = [*count, "--batch_size", args.batch_size, "--seed", args.seed, "--out", samples]
    if row["method"] == "fp":
        if not os.path.exists(samples):
            if args.preset == "digits":  # (the preset's FP sampler; the other families sample FP through 04)
                runner(run_dir, "scripts/sample_diffusion.py", "--preset", "digits", "--ddim_steps", 20, "--eta", 0.0,
                       "--scale", 3.0, *sample_args)
            else:  # the FP UNet through the same loop as the quantized rows (bit-identical to scripts/txt2img.py)
                runner(run_dir, "quant_scripts/04_sample_lora_model.py", "--preset", args.preset, "--run_dir", run_dir,
                       "--fp", *sample_args)
        return {}
    if row.get("stage") == "naive":
        source_dir = os.path.join(args.out_dir, row["source"])
        if not os.path.exists(samples):
            runner(run_dir, "quant_scripts/04_sample_lora_model.py", "--preset", args.preset, "--run_dir",
                   source_dir, "--stage", "naive", *sample_args)
        return {}
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(os.path.join(run_dir, "calib.pt")):
        os.link(calib, os.path.join(run_dir, "calib.pt"))
    common = ["--preset", args.preset, "--run_dir", run_dir]
    ptq = row.get("stage") == "ptq"
    timing = os.path.join(run_dir, "ptq_seconds.json" if ptq else "finetune_seconds.json")
    if not os.path.exists(os.path.join(run_dir, "naive.pt")):
        seconds, cpu = runner.timed(run_dir, "quant_scripts/02_quantize_ldm_naive.py", *common, "--method",
                                    row["method"], "--n_bits_w", row["w"], "--n_bits_a", row["a"],
                                    *row.get("flags", []))
        if ptq:
            atomic_write_bytes(timing, json.dumps({"seconds": seconds, "cpu_seconds": cpu}).encode())
    if not ptq and not os.path.exists(os.path.join(run_dir, "finetuned.pt")):
        seconds, cpu = runner.timed(run_dir, "quant_scripts/03_train_mpqdm.py", *common, "--epochs", args.epochs,
                                    *row.get("ft_flags", PAPER_LR))
        record = {"seconds": seconds, "cpu_seconds": cpu, "epochs": args.epochs}
        atomic_write_bytes(timing, json.dumps(record).encode())
    if not os.path.exists(samples):
        runner(run_dir, "quant_scripts/04_sample_lora_model.py", *common, *sample_args)
    return json.load(open(timing)) if os.path.exists(timing) else {}


def main(argv=None):
    args = build_parser().parse_args(argv)
    prof = PROFILES[args.profile]
    args.epochs = args.epochs or prof["epochs"]
    args.n_samples = args.n_samples or prof["n_samples"]
    args.out_dir = os.path.abspath(args.out_dir or prof["out_dir"])
    md_path, json_path = args.md or prof["md"], args.json or prof["json"]
    args.preset = prof.get("preset", "digits")
    per = TEXT_PROMPTS if args.preset == "digits-txt2img" else 10
    if args.n_samples % per:
        raise UserError(f"--n_samples must be a multiple of {per} (balanced over the "
                        f"{'held-out prompts' if per == 20 else 'digits'}), got {args.n_samples}")
    command = "python benchmarks/digits_table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    all_rows = prof["rows"] + [r for r in prof["ablation"] if r["name"] not in {x["name"] for x in prof["rows"]}]
    rows = select_rows(all_rows, args.rows) if args.rows else all_rows
    md_file, json_file = (p if os.path.isabs(p) else os.path.join(REPO, p) for p in (md_path, json_path))
    kept = kept_records(json_file, [r["name"] for r in all_rows if r not in rows] + ["fp"]) if args.rows else {}
    old_fp = kept.pop("fp", None)
    load = os.getloadavg()[0]
    runner = StepRunner(args.quiet)
    started = time.time()

    calibs = {}
    for recipe in sorted({r.get("calib", "trajectory") for r in rows if r["method"] != "fp"} | {"trajectory"}):
        calib_dir = os.path.join(args.out_dir, "calib" if recipe == "trajectory" else f"calib-{recipe}")
        calibs[recipe] = os.path.join(calib_dir, "calib.pt")
        if not os.path.exists(calibs[recipe]):
            print(f"[01] calibration data ({recipe})", flush=True)
            runner(calib_dir, "quant_scripts/01_collect_input_4_calib.py", "--preset", args.preset, "--run_dir",
                   calib_dir, *CALIBRATIONS[args.preset][recipe])

    # Fine-tuned runs first (naive rows sample from their artifacts), in parallel chains.
    trained = [r for r in rows if r.get("stage") != "naive"]
    naive = [r for r in rows if r.get("stage") == "naive"]
    timings = {}
    for batch in (trained, naive):
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {r["name"]: pool.submit(run_row, r, args, runner, calibs[r.get("calib", "trajectory")])
                       for r in batch}
            for name, fut in futures.items():
                timings[name] = fut.result()
                print(f"[done] {name}", flush=True)

    fp_npz = os.path.join(args.out_dir, "fp", "samples.npz")
    records = {}
    for r in rows:
        metrics = digits_row_metrics(os.path.join(args.out_dir, r["name"], "samples.npz"), fp_npz)
        records[r["name"]] = dict(name=r["name"], label=r["label"], method=r["method"], w_bits=r["w"], a_bits=r["a"],
                                  stage=r.get("stage", "finetuned" if r["method"] != "fp" else "fp"),
                                  flags=r.get("flags", []) + r.get("ft_flags", []), **metrics, n_samples=args.n_samples,
                                  seconds=timings[r["name"]].get("seconds"),
                                  cpu_seconds=timings[r["name"]].get("cpu_seconds"),
                                  epochs=None if r["method"] == "fp" or r.get("stage") == "ptq" else args.epochs,
                                  command=command)
    records.update(kept)

    if args.preset == "digits-txt2img":
        model_settings = (f"digits text-to-image LDM (models/ldm/digits-txt2img), samples: PLMS 50 steps, eta 0, CFG "
                          f"3.0 against \"\", {args.n_samples} images ({args.n_samples // TEXT_PROMPTS} per held-out "
                          f"prompt, 2 phrasings x 10 digits), seed {args.seed}; fine-tuning: {args.epochs} epochs x "
                          "50 steps, digits-txt2img preset of quant_scripts (calibration: PLMS-50 trajectories of 8 "
                          "training-phrasing prompts, 32 naive tuples); cond. acc. = prompt accuracy (the digits "
                          "CNN's class against the prompt's digit)")
    elif args.preset == "digits-pixel":
        model_settings = (f"pixel-space DDIM miniature (models/ddim/digits-pixel, unconditional), samples: DDIM 20 "
                          f"steps with the quadratic skip, eta 0, no guidance, {args.n_samples} images, seed "
                          f"{args.seed}; fine-tuning: {args.epochs} epochs x 20 steps, digits-pixel preset of "
                          "quant_scripts (calibration: quad-20 eta-0 trajectories of 16 images, 32 naive tuples); "
                          "unconditional, so no conditional accuracy")
    else:
        model_settings = (f"digits LDM-4 (models/ldm/digits-ldm-vq-4), samples: DDIM 20 steps, eta 0, CFG 3.0, "
                          f"{args.n_samples} images ({args.n_samples // 10} per digit), seed {args.seed}; fine-tuning: "
                          f"{args.epochs} epochs x 20 steps, digits preset of quant_scripts (calibration 50-step "
                          "DDIM trajectories, 32 naive tuples)")
    settings = (f"{model_settings}; metrics by the shipped digits CNN; FID/sFID/precision/recall "
                f"against the 1,437 real training digits; FID-FP and PSNR against the FP samples drawn from the same "
                f"noise; fine-tuning seconds measured with {args.jobs} run(s) in parallel, one thread each, as wall "
                f"time and (where recorded) the CPU time of that process alone.")
    # the guided presets record an unconditional and a conditional row per sample
    x2 = "" if args.preset == "digits-pixel" else ", x2 rows with guidance"
    if any(r.get("stage") == "ptq" for r in all_rows):
        from quant.methods.qdiffusion import PRESETS as QDIFF
        q = QDIFF[args.preset]
        settings += (f" Q-Diffusion rows (stage ptq) are post-training: no fine-tuning, 02 with the {args.preset} "
                     f"preset's reconstruction ({q['cali_st']} calibration steps x {q['cali_n']} trajectories{x2}; "
                     f"{q['weight_iters']} AdaRound + {q['act_iters']} activation-delta "
                     "iterations per block, nothing kept FP, attention matmuls quantized, one activation scale for "
                     "all steps); their seconds are 02's wall time.")
    if any(r["method"] == "tfmqdm" for r in all_rows):
        from quant.calib_fresh import unet_calls
        from quant.methods.tfmqdm import PRESETS as TFMQ
        t = TFMQ[args.preset]
        settings += (f" TFMQ-DM rows (stage ptq, 02 --method tfmqdm with the {args.preset} preset's options and the "
                     "row's --fsc / --tiar) calibrate on TFMQ-DM's own data: a fresh FP run per step on the sampling "
                     "schedule (01 " + " ".join(map(str, CALIBRATIONS[args.preset]["tfmqdm"]))
                     + f", {unet_calls(20)} UNet calls "
                     "per batch of trajectories instead of 20, not counted in the rows' seconds); TIAR "
                     f"({t['tiar_iters']} AdaRound iterations "
                     f"on the time MLP and every ResBlock's embedding linear), then {t['weight_iters']} AdaRound "
                     f"iterations per block on {t['cali_st']} of the 20 steps x {t['cali_n']} trajectories{x2}, "
                     "then FSC: min-max with EMA (momentum 0.95) from an MSE init, on all 20 steps "
                     f"x {t['fsc_n']} trajectories, one activation set per step on the time-embedding block's "
                     "inputs (FSC paper) or on every activation quantizer (FSC released), one set elsewhere; no "
                     "activation-delta learning; FP: the input and output convs, the time MLP's first linear and the "
                     "skip / downsample convs; attention matmuls quantized; their seconds are 02's wall time.")
    if any(r["method"] == "edadm" for r in all_rows):
        from quant.methods.edadm import preset_options as eda_options
        e = eda_options(args.preset, w_bits=4, a_bits=8)
        settings += (f" EDA-DM rows (stage ptq, 02 --method edadm with the {args.preset} preset's options and the "
                     "row's flags) calibrate on their own trajectories (01 "
                     + " ".join(map(str, CALIBRATIONS[args.preset]["edadm"]))
                     + f"): TDAC picks how many of N = {e['tdac_n']} trajectories (one sample each{x2}) come from "
                     f"each of the 20 steps (r {e['tdac_radius']}, lambda {e['tdac_lambda']}; "
                     "'TDAC off': the same count per step); range-search inits, activation init by EMA over all rows; "
                     f"then FBR, {e['weight_iters']} iterations per block: AdaRound and activation delta learned "
                     f"jointly (lr_w / lr_a {e['weight_lr']:g} / {e['act_lr']:g} at W<8, the W8A8 recipe's at W8A8), "
                     f"block loss + {e['add_loss']:g} x layer losses, QDrop 0.5; W8 the time MLP's first linear "
                     "and the output conv, output-conv input FP, 8-bit activations at the second-to-last layer; their "
                     "seconds are 02's wall time.")
    full = PROFILES["text" if args.profile == "demo-text" else "full"]
    if old_fp is not None and f"{old_fp['FID']:.4f}" != f"{records['fp']['FID']:.4f}":  # beyond float noise
        settings += (f" The FP samples re-drawn by the last command differ from those the kept rows were scored "
                     f"against (FID {records['fp']['FID']:.4f} against {old_fp['FID']:.4f}).")
    commands = list(dict.fromkeys(records[r["name"]]["command"] for r in all_rows))
    md = [f"# Digits results ({args.profile} profile)", "", "Command:" if len(commands) == 1 else
          "Commands (each row was measured by the one its record in the JSON names; the last wrote this file):", "",
          "```", *commands, "```", "", f"Settings: {settings}", "",
          *([f"Demo budget: {args.epochs} fine-tuning epochs and {args.n_samples} samples per row, shorter than "
             f"the results table's ({full['epochs']} epochs, {full['n_samples']} samples); see {full['md']} for the "
             "full measurement.", ""] if args.profile.startswith("demo") else []),
          "Total wall time of the command that wrote this: "
          f"{time.time() - started:.0f} s (re-runs skip finished artifacts); 1-minute load average when it started: "
          f"{load:.2f}.", ""]
    md += _table("Main table", [records[r["name"]] for r in prof["rows"]])
    if prof["ablation"]:
        bits = sorted({(r["w"], r["a"]) for r in prof["ablation"]}, reverse=True)
        at = ", ".join(f"W{w}A{a}" for w, a in bits)
        md += ["", f"Same command, same settings; rows at {at}:", ""]
        md += _table(f"Ablation at {at}", [records[r["name"]] for r in prof["ablation"]])
    text = "\n".join(md) + "\n"
    atomic_write_bytes(md_file, text.encode())
    ordered = [records[r["name"]] for r in all_rows]
    atomic_write_bytes(json_file, (json.dumps(ordered, indent=1) + "\n").encode())
    print(text)
    print(f"table: {md_path}  records: {json_path}  sample grids: {args.out_dir}/<row>/samples_grid.png")


def _table(title, records):
    head = ["method", "W/A", "stage"] + [c[1] for c in DIGITS_METRIC_COLUMNS] + ["fine-tune / PTQ s (CPU s)"]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in records:
        wa = "32/32" if rec["method"] == "fp" else f"{rec['w_bits']}/{rec['a_bits']}"
        cells = [rec["label"], wa, rec["stage"]] + [format_metric(c[0], rec.get(c[0])) for c in DIGITS_METRIC_COLUMNS]
        cpu = f" ({rec['cpu_seconds']:.0f})" if rec.get("cpu_seconds") is not None else ""
        cells.append("–" if rec["seconds"] is None else f"{rec['seconds']:.0f}{cpu}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    cli_main(main)
