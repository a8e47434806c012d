"""Stage 3: fine-tune the naive quantized UNet against the FP teacher -> run_dir/finetuned.pt (MPQ-DM.md §9).

Method, bits, schedule and TRD options come from naive.pt (chosen once in stage 2). Each epoch runs one
teacher-forced trajectory of B random conditions (seed 3407 + epoch): classes, or prompts drawn from calib.pt's
calibration prompts (text models, CFG against ""), or none (the pixel family: no guidance). The trajectory is the
family's (ldm.pipelines): uniform DDIM for LDMs (PLMS samples the same timesteps), the quad/uniform generalized_steps
sequence for pixel models with its identity steps (t == t_next) skipped. Each step is one AdamW step on
Σ(ε̃_q − ε̃_fp)² (+ TRD). A resumable checkpoint (run_dir/finetune_state.pt) is written every --checkpoint_every
epochs; re-running the same command continues from it.
"""
import os

# _common first: it puts the repository root on sys.path
from _common import (A_BITS, DDIM_ETA, MADE_BY, SEED, W_BITS, adapter, agree, artifact_path, build_student,
                     check_ident, distinct, family, load_fp_model, load_stage_artifact, model_config, parser,
                     prepare_run_dir, resolve, schedule_for, skip_type)
from ldm import cli
from ldm.util import UserError, cli_main
from quant.artifacts import save_artifact

# ---- constants: MPQ-DM ImageNet defaults (each is also a flag; a --preset may override) ----
CONSTANTS = {
    "epochs": 800,               # 800 epochs x 20 steps = 16,000 iterations
    "batch_size": 4,             # B trajectories per epoch (8 UNet rows with CFG)
    "eta": 0.0,                  # DDIM eta of the training trajectory
    "scale": 3.0,                # CFG scale of the training trajectory
    "seed": 3407,                # epoch e draws classes and x_T from seed + e
    "checkpoint_every": 10,      # epochs between resumable checkpoints
    "preview_every": 80,         # epochs between preview grids (0 = none)
    "preview_classes": [88, 417],
    "nan_patience": 5,           # abort after this many consecutive non-finite steps
    "lora_lr_scale": 1.0,        # x the paper's LoRA lr avg_Δ/2500 (the digits preset: 0.1, results/digits_budget.md)
    "weight_decay": 0.01,        # AdamW weight decay of every trainable group
}


def build_parser():
    p = parser(__doc__, CONSTANTS, "finetune")
    p.add_argument("--epochs", type=cli.positive_int, help="epochs; one DDIM trajectory (S optimizer steps) per epoch")
    p.add_argument("--batch_size", type=cli.positive_int, help="trajectories per epoch (B)")
    p.add_argument("--eta", type=DDIM_ETA, help="DDIM eta of the training trajectories, in [0, 1]")
    p.add_argument("--scale", type=cli.nonneg_float,
                   help="classifier-free guidance scale of the training trajectories")
    p.add_argument("--seed", type=SEED, help="base seed; epoch e uses seed + e")
    p.add_argument("--checkpoint_every", type=cli.nonneg_int,
                   help="epochs between resumable checkpoints (0: only at the end)")
    p.add_argument("--preview_every", type=cli.nonneg_int,
                   help="epochs between preview PNG grids in run_dir/previews (0: none)")
    p.add_argument("--preview_classes", type=cli.nonneg_int, nargs="+", help="classes shown in previews")
    p.add_argument("--lora_lr_scale", type=cli.positive_float,
                   help="multiply every LoRA group's learning rate (1.0 = the paper's avg_Δ/2500 per layer)")
    p.add_argument("--weight_decay", type=cli.nonneg_float, help="AdamW weight decay of every trainable group")
    p.add_argument("--nan_patience", type=cli.positive_int,
                   help="consecutive non-finite steps tolerated before aborting")
    p.add_argument("--grad_checkpoint", action="store_true",
                   help="gradient checkpointing in the student's blocks (less memory, ~30%% more time)")
    p.add_argument("--stop_after_epoch", type=cli.positive_int, default=None,
                   help="time-boxed run: stop with a checkpoint once this many epochs are done; re-run to continue "
                        "(finetuned.pt is written only when all epochs are done)")
    p.add_argument("--teacher", choices=["same", "non_ema"], default="same",
                   help="FP teacher: the student's own starting weights (default; EMA for LSUN) or, as the released "
                        "LSUN code, the checkpoint's non-EMA weights")
    p.add_argument("--restart", action="store_true", help="ignore an existing resumable checkpoint and start over")
    # accepted for symmetry with stage 2; must agree with naive.pt
    p.add_argument("--method", choices=["efficientdm", "mpqdm", "mpqdm+"], help="must match naive.pt if given")
    p.add_argument("--n_bits_w", type=W_BITS, help="must match naive.pt if given")
    p.add_argument("--n_bits_a", type=A_BITS, help="must match naive.pt if given")
    return p


def check_args(args):
    """Cross-flag rules, from the flags and the model config alone (before any model is loaded)."""
    from ldm.presets import get_preset

    model_config(args)  # readable, and its targets allowed
    if args.teacher == "non_ema" and not get_preset(args.preset).use_ema:
        raise UserError("--teacher non_ema needs a preset that starts from EMA weights (the LSUN ones).")


def check_naive(args, meta):
    """naive.pt agrees with the flags and holds the schedule this loop trains on (the family's sequence of
    train_steps steps; its distinct values are the step-table keys); returns its number of steps."""
    if meta.get("training") == "ptq":
        raise UserError(f"{artifact_path(args, 'naive')} holds a {meta.get('method')} post-training model, which is "
                        "complete after stage 2 and has no fine-tuning step; sample it with "
                        "quant_scripts/04_sample_lora_model.py.")
    agree(args, meta, {"method": "method", "n_bits_w": "n_bits_w", "n_bits_a": "n_bits_a"}, "naive artifact")
    timesteps = meta.get("timesteps")
    if not isinstance(timesteps, list) or not timesteps or not isinstance(meta.get("config"), dict):
        raise UserError(f"{artifact_path(args, 'naive')} records no quantized structure (config, timesteps); "
                        "re-run quant_scripts/02_quantize_ldm_naive.py.")
    steps = meta.get("train_steps", len(timesteps))
    try:
        schedule = distinct(schedule_for(args, steps, "naive.pt's schedule"))
    except UserError:
        schedule = None
    if schedule != list(timesteps):
        spacing = "uniform DDIM" if family(args) == "ldm" else f"{skip_type(args)} DDIM"
        raise UserError(f"naive.pt's schedule {timesteps[:3]}... is not the {spacing} schedule of {steps} steps this "
                        "loop trains on; re-run stage 2 with --train_steps.")
    return steps


def training_prompts(args, meta):
    """Text models: the calibration prompts recorded by stage 1 (via naive.pt), drawn B per epoch."""
    record = meta.get("calib_prompts")
    if not record or not record.get("prompts"):
        raise UserError(f"{artifact_path(args, 'naive')} records no calibration prompts, which a text model trains "
                        "on; re-run quant_scripts/01_collect_input_4_calib.py and 02 with this text preset.")
    return tuple(str(p) for p in record["prompts"])


def diverged_advice(err, args):
    """A divergence message whose advice can be followed: a resume pins the learning rates of its checkpoint."""
    lower = f"lower --lora_lr_scale (now {args.lora_lr_scale:g}, e.g. to {args.lora_lr_scale / 10:g})"
    if err.checkpoint_epoch is None:
        return f"{err}, before any checkpoint was written; {lower} and re-run."
    return (f"{err}; resuming the checkpoint of epoch {err.checkpoint_epoch} would keep its learning rates, so "
            f"{lower} and re-run with --restart.")


def main(argv=None):
    args = resolve(build_parser().parse_args(argv), "finetune", CONSTANTS)
    check_args(args)
    prepare_run_dir(args)
    naive = load_stage_artifact(args, "naive")
    meta = naive["meta"]
    steps = check_naive(args, meta)

    from quant.stages.finetune import FinetuneConfig, FinetuneDiverged, finetune
    from quant.stages.optim import param_groups

    model, ident = load_fp_model(args)
    check_ident(naive, ident, "naive", artifact_path(args, "naive"))
    fam = adapter(model)
    conditional, n_classes, null_class = fam.conditioning == "class", fam.n_classes, fam.null_class
    prompts = training_prompts(args, meta) if fam.conditioning == "text" else None
    options = meta["config"]
    cfg = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, ddim_steps=steps, ddim_eta=args.eta,
        guidance_scale=args.scale if fam.conditioning != "none" else 1.0,
        num_classes=n_classes if conditional else None, null_class=null_class if conditional else 0,
        prompts=prompts, skip_type=skip_type(args) if fam.family == "pixel" else None, seed=args.seed,
        weight_decay=args.weight_decay,
        trd_mode=options.get("trd_mode", "off"), trd_window=options.get("trd_window", 2),
        trd_lambda=options.get("trd_lambda", 100.0), trd_tau=options.get("trd_tau", 1.0),
        trd_cadence=options.get("trd_cadence", "aligned"), grad_checkpoint=args.grad_checkpoint,
        nan_patience=args.nan_patience, checkpoint_every=args.checkpoint_every, preview_every=args.preview_every,
        preview_classes=tuple(c for c in args.preview_classes if not conditional or c < n_classes) or (0,),
        lora_lr_scale=args.lora_lr_scale, teacher=args.teacher, student_id=meta["checksum"][:16],
        progress=not args.no_progress)

    teacher_unet = None
    if args.teacher == "non_ema":
        teacher_unet = load_fp_model(args, use_ema=False)[0].model.diffusion_model
    student = build_student(model, meta, naive["state_dict"], what=f"naive artifact {artifact_path(args, 'naive')}",
                            made_by=MADE_BY["naive"])
    del naive
    groups = param_groups(student, lora_lr_scale=args.lora_lr_scale, weight_decay=cfg.weight_decay)
    state_path = os.path.join(args.run_dir, "finetune_state.pt")
    if args.restart and os.path.exists(state_path):
        os.remove(state_path)
    try:
        history = finetune(model, student, groups, cfg, teacher_unet=teacher_unet, ckpt_path=state_path,
                           preview_dir=os.path.join(args.run_dir, "previews"), until_epoch=args.stop_after_epoch)
    except FinetuneDiverged as err:
        raise UserError(diverged_advice(err, args)) from None
    if len(history) < args.epochs:
        print(f"stopped after epoch {len(history)}/{args.epochs}; checkpoint {state_path}; re-run to continue")
        return None

    out_meta = {**{k: v for k, v in meta.items() if k not in ("stage", "toolkit_version")},
                "stage": "finetuned", "finetune": cfg.resume_key(), "final_loss": history[-1]["loss"],
                "history": history}
    path = artifact_path(args, "finetuned")
    try:
        save_artifact(path, out_meta, parent={"naive": meta["checksum"]}, state_dict=student.state_dict())
    except UserError as err:  # the resume state holds every epoch: the re-run only writes the file
        raise UserError(f"{err} (the checkpoint {state_path} keeps all {args.epochs} epochs, so the re-run only "
                        "writes the file)") from None
    print(f"wrote {path}: {args.epochs} epochs x {steps} steps, final epoch loss {history[-1]['loss']:.4g}")
    return path


if __name__ == "__main__":
    cli_main(main)
