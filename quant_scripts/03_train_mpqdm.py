"""Stage 3: fine-tune the naive quantized UNet against the FP teacher -> run_dir/finetuned.pt (MPQ-DM.md §9).

Method, bits, schedule and TRD options come from naive.pt (chosen once in stage 2). Each epoch runs one
teacher-forced DDIM trajectory of B random classes (seed 3407 + epoch); each step is one AdamW step on
Σ(ε̃_q − ε̃_fp)² (+ TRD). A resumable checkpoint (run_dir/finetune_state.pt) is written every
--checkpoint_every epochs; re-running the same command continues from it.
"""
import hashlib
import json
import os

# _common first: it puts the repository root on sys.path
from _common import (agree, artifact_path, build_student, class_info, load_fp_model, load_stage_artifact, parser,
                     resolve)
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
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
    "lora_lr_scale": 1.0,        # x the paper's LoRA lr avg_Δ/2500 (see results/digits.md for 0.1 on digits)
}


def build_parser():
    p = parser(__doc__, CONSTANTS, "finetune")
    p.add_argument("--epochs", type=int, help="epochs; one DDIM trajectory (S optimizer steps) per epoch")
    p.add_argument("--batch_size", type=int, help="trajectories per epoch (B)")
    p.add_argument("--eta", type=float, help="DDIM eta of the training trajectories")
    p.add_argument("--scale", type=float, help="classifier-free guidance scale of the training trajectories")
    p.add_argument("--seed", type=int, help="base seed; epoch e uses seed + e")
    p.add_argument("--checkpoint_every", type=int, help="epochs between resumable checkpoints (0: only at the end)")
    p.add_argument("--preview_every", type=int, help="epochs between preview PNG grids in run_dir/previews (0: none)")
    p.add_argument("--preview_classes", type=int, nargs="+", help="classes shown in previews")
    p.add_argument("--lora_lr_scale", type=float,
                   help="multiply every LoRA group's learning rate (1.0 = the paper's avg_Δ/2500 per layer)")
    p.add_argument("--nan_patience", type=int, help="consecutive non-finite steps tolerated before aborting")
    p.add_argument("--grad_checkpoint", action="store_true",
                   help="gradient checkpointing in the student's blocks (less memory, ~30%% more time)")
    p.add_argument("--stop_after_epoch", type=int, default=None,
                   help="time-boxed run: stop with a checkpoint once this many epochs are done; re-run to continue "
                        "(finetuned.pt is written only when all epochs are done)")
    p.add_argument("--teacher", choices=["same", "non_ema"], default="same",
                   help="FP teacher: the student's own starting weights (default; EMA for LSUN) or, as the released "
                        "LSUN code, the checkpoint's non-EMA weights")
    p.add_argument("--restart", action="store_true", help="ignore an existing resumable checkpoint and start over")
    # accepted for symmetry with stage 2; must agree with naive.pt
    p.add_argument("--method", choices=["efficientdm", "mpqdm", "mpqdm+"], help="must match naive.pt if given")
    p.add_argument("--n_bits_w", type=int, help="must match naive.pt if given")
    p.add_argument("--n_bits_a", type=int, help="must match naive.pt if given")
    return p


def meta_digest(meta):
    """Short hash of the naive artifact's meta: a resume checkpoint made for another naive.pt is refused."""
    text = json.dumps(meta, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(argv=None):
    args = resolve(build_parser().parse_args(argv), "finetune", CONSTANTS)
    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch_size must be positive.")

    from quant.stages.finetune import FinetuneConfig, FinetuneDiverged, finetune
    from quant.stages.optim import param_groups

    model, ident = load_fp_model(args)
    naive = load_stage_artifact(args, "naive", ident)
    meta = naive["meta"]
    if meta.get("stage") != "naive":
        raise UserError(f"{artifact_path(args, 'naive')} is a {meta.get('stage')!r} artifact, not a naive one.")
    agree(args, meta, {"method": "method", "n_bits_w": "n_bits_w", "n_bits_a": "n_bits_a"}, "naive artifact")
    steps = len(meta["timesteps"])
    schedule = [int(v) for v in make_ddim_timesteps("uniform", steps, model.num_timesteps, verbose=False)]
    if schedule != list(meta["timesteps"]):
        raise UserError(f"naive.pt's schedule {meta['timesteps'][:3]}... is not the uniform {steps}-step DDIM "
                        "schedule this loop trains on; re-run stage 2 with --train_steps.")
    conditional, n_classes, null_class = class_info(model)
    options = meta["config"]
    cfg = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, ddim_steps=steps, ddim_eta=args.eta,
        guidance_scale=args.scale if conditional else 1.0, num_classes=n_classes if conditional else None,
        null_class=null_class if conditional else 0, seed=args.seed,
        trd_mode=options.get("trd_mode", "off"), trd_window=options.get("trd_window", 2),
        trd_lambda=options.get("trd_lambda", 100.0), trd_tau=options.get("trd_tau", 1.0),
        trd_cadence=options.get("trd_cadence", "aligned"), grad_checkpoint=args.grad_checkpoint,
        nan_patience=args.nan_patience, checkpoint_every=args.checkpoint_every, preview_every=args.preview_every,
        preview_classes=tuple(c for c in args.preview_classes if not conditional or c < n_classes) or (0,),
        lora_lr_scale=args.lora_lr_scale, teacher=args.teacher, student_id=meta_digest(meta),
        progress=not args.no_progress)

    teacher_unet = None
    if args.teacher == "non_ema":
        if not ident["use_ema"]:
            raise UserError("--teacher non_ema needs a preset that starts from EMA weights (the LSUN ones).")
        teacher_unet = load_fp_model(args, use_ema=False)[0].model.diffusion_model
    student = build_student(model, meta, naive["state_dict"])
    del naive
    groups = param_groups(student, lora_lr_scale=args.lora_lr_scale)
    state_path = os.path.join(args.run_dir, "finetune_state.pt")
    if args.restart and os.path.exists(state_path):
        os.remove(state_path)
    try:
        history = finetune(model, student, groups, cfg, teacher_unet=teacher_unet, ckpt_path=state_path,
                           preview_dir=os.path.join(args.run_dir, "previews"), until_epoch=args.stop_after_epoch)
    except FinetuneDiverged as err:
        raise UserError(f"{err}.") from None
    if len(history) < args.epochs:
        print(f"stopped after epoch {len(history)}/{args.epochs}; checkpoint {state_path}; re-run to continue")
        return None

    out_meta = {**{k: v for k, v in meta.items() if k not in ("stage", "format", "toolkit_version")},
                "stage": "finetuned", "finetune": cfg.resume_key(), "final_loss": history[-1]["loss"],
                "history": history}
    path = artifact_path(args, "finetuned")
    save_artifact(path, out_meta, state_dict=student.state_dict())
    print(f"wrote {path}: {args.epochs} epochs x {steps} steps, final epoch loss {history[-1]['loss']:.4g}")
    return path


if __name__ == "__main__":
    cli_main(main)
