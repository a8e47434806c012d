"""Stage 1: record the FP UNet's inputs along sampling trajectories -> run_dir/calib.pt (MPQ-DM.md §2).

The model is not edited: LatentDiffusion.record_unet_inputs() hooks the UNet for the duration of sampling (the pixel
family records the inputs of each generalized_steps step through the sampler's callback). The file holds the
flattened tuples x [N,...], t [N], context [N,...] (absent for unconditional models) and, for conditional models,
uncond_context [1,...] (the null class's or the "" prompt's context); entries in sampling order, one per sampling
step (PLMS's first-step look-ahead call is not recorded), with the uncond rows of each step first.

Per family (ldm.pipelines): class-conditional LDMs draw a random class per trajectory; text LDMs take one
calibration prompt per trajectory (a seeded selection from --calib_prompts, disjoint from the evaluation prompts
of --eval_prompts unless --calib_overlap_pitfall); the pixel family is unconditional, no guidance, no first stage.

--calib_data fresh_per_step is TFMQ-DM's data (PEERS.md §3.4): every step's entry comes from its own fresh FP run
(new noise, the batch's classes or prompts), stopped after that step, at the cost of n(n+1)/2 sampling steps per
batch instead of n (printed before it starts); the file has the same layout, so any post-training method selects
from it.
"""
import torch

# _common first: it puts the repository root on sys.path
from _common import (DDIM_ETA, SEED, adapter, artifact_path, check_model_files, load_fp_model, parser,
                     prepare_run_dir, resolve, schedule_for, skip_type)
from ldm import cli
from ldm.util import UserError, cli_main
from quant.artifacts import save_artifact
from quant.calib_fresh import record_fresh_per_step

# ---- constants: MPQ-DM ImageNet defaults (each is also a flag; a --preset may override) ----
CONSTANTS = {
    "calib_sampler": "ddim",  # sampler of the recorded trajectories (text presets: PLMS, as they sample)
    "calib_steps": 250,      # sampling steps of the recorded trajectory
    "calib_eta": 1.0,        # DDIM eta
    "calib_scale": 1.5,      # classifier-free guidance scale (ignored for unconditional models)
    "calib_batch": 8,        # B trajectories per batch (random classes / B prompts); the UNet sees 2B rows with CFG
    "calib_batches": 1,      # number of such batches (ImageNet: 1 -> 2B*250 = 4000 tuples)
    "seed": 0,               # classes, x_T and per-step noise
    "prompt_seed": 0,        # text models: the evaluation selection (as 04 draws it) and the calibration draw
    "calib_data": "trajectory",  # trajectory: one run per batch, every step kept | fresh_per_step: TFMQ-DM's
}


def build_parser():
    p = parser(__doc__, CONSTANTS, "calib")
    p.add_argument("--calib_sampler", choices=["ddim", "plms"],
                   help="sampler of the recorded trajectories (PLMS needs --calib_eta 0; pixel models: ddim)")
    p.add_argument("--calib_steps", type=cli.positive_int,
                   help="sampling steps of each recorded trajectory (the spacing must fit the model's schedule)")
    p.add_argument("--calib_eta", type=DDIM_ETA, help="DDIM eta of the recorded trajectories, in [0, 1]")
    p.add_argument("--calib_scale", type=cli.nonneg_float, help="classifier-free guidance scale while recording")
    p.add_argument("--calib_batch", type=cli.positive_int,
                   help="trajectories per batch (random classes, or one calibration prompt each)")
    p.add_argument("--calib_batches", type=cli.positive_int, help="number of batches to record")
    p.add_argument("--seed", type=SEED, help="seed of classes, x_T and sampler noise")
    p.add_argument("--calib_data", choices=["trajectory", "fresh_per_step"],
                   help="trajectory: each batch's one sampling run, every step kept (Q-Diffusion, MPQ-DM); "
                        "fresh_per_step: a fresh run from new noise for every step, kept only at that step "
                        "(TFMQ-DM; n(n+1)/2 sampling steps per batch instead of n)")
    t = p.add_argument_group("text models (calibration prompts: calib_batch x calib_batches of them)")
    t.add_argument("--calib_prompts", default=None, metavar="SOURCE",
                   help="calibration prompt set: a COCO captions JSON (e.g. captions_train2014.json), a text file "
                        "with one prompt per line, or digits-train / digits-heldout (default: the preset's)")
    t.add_argument("--eval_prompts", default=None, metavar="SOURCE",
                   help="the evaluation prompt set the calibration prompts must stay out of (default: the preset's, "
                        "else --calib_prompts)")
    t.add_argument("--eval_n_prompts", type=cli.positive_int, default=None,
                   help="size of the evaluation selection to stay out of, drawn as 04 draws it (default: the "
                        "preset's, e.g. 10,000 for sd-v1-4; all prompts when it has none)")
    t.add_argument("--prompt_seed", type=SEED, default=None,
                   help="seed of the evaluation selection (04's --prompt_seed) and of the calibration draw")
    t.add_argument("--calib_overlap_pitfall", action="store_true",
                   help="PITFALL (EDA-DM): allow calibration prompts that are also evaluation prompts, which "
                        "flatters the evaluation; recorded in calib.pt and in every later artifact")
    return p


def check_args(args):
    """Cross-flag rules, from the flags and the model config alone (before any model is loaded); returns the
    calibration prompts (text presets) or None."""
    from ldm.presets import get_preset

    preset = get_preset(args.preset)
    schedule_for(args, args.calib_steps, "--calib_steps")
    if args.calib_sampler == "plms" and args.calib_eta != 0:
        raise UserError(f"the PLMS sampler is deterministic and needs --calib_eta 0, got {args.calib_eta}.")
    if preset.family == "pixel" and args.calib_sampler != "ddim":
        raise UserError(f"pixel models sample with DDIM (generalized_steps), not --calib_sampler {args.calib_sampler}.")
    text_flags = [f for f in ("calib_prompts", "eval_prompts", "eval_n_prompts") if getattr(args, f) is not None]
    if preset.cond_kind == "text":
        check_model_files(args)  # the model's files before the prompt files
    if preset.cond_kind != "text":
        if text_flags or args.calib_overlap_pitfall:
            flag = text_flags[0] if text_flags else "calib_overlap_pitfall"
            raise UserError(f"--{flag} applies to text models; preset {args.preset} is not conditioned on text.")
        return None
    from ldm.pipelines import calibration_prompts

    source = args.calib_prompts or preset.calib_prompts
    if source is None:
        raise UserError(f"preset {args.preset} needs --calib_prompts: a COCO captions JSON such as "
                        "captions_train2014.json, or a text file with one prompt per line.")
    eval_source = args.eval_prompts or preset.prompts or source
    eval_n = args.eval_n_prompts if args.eval_n_prompts is not None else preset.n_prompts
    return calibration_prompts(source, args.calib_batch * args.calib_batches, args.prompt_seed, eval_source, eval_n,
                               args.calib_overlap_pitfall)


@torch.no_grad()
def collect(model, args, prompts=None):
    """Entries (one per sampling step of each trajectory batch), class labels drawn, sampling timesteps."""
    fam = adapter(model)
    spacing = skip_type(args)
    gen = torch.Generator().manual_seed(args.seed)
    entries, labels_all = [], []
    conditional = fam.conditioning != "none"
    for b in range(args.calib_batches):
        items = None
        if fam.conditioning == "class":
            labels = torch.randint(0, fam.n_classes, (args.calib_batch,), generator=gen)
            labels_all += labels.tolist()
            items = labels.numpy()
        elif fam.conditioning == "text":
            items = prompts[b * args.calib_batch:(b + 1) * args.calib_batch]
        cond = fam.cond(items) if conditional else None
        uncond = fam.uncond(args.calib_batch) if conditional else None
        scale = args.calib_scale if conditional else 1.0
        if args.calib_data == "fresh_per_step":
            entries += record_fresh_per_step(fam, fresh_draw(fam, args, gen, cond, uncond), scale,
                                             args.calib_steps, args.calib_eta, args.calib_sampler, spacing,
                                             progress=not args.no_progress)
            continue
        x_T = torch.randn((args.calib_batch, *fam.latent_shape), generator=gen).to(model.device)
        noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
        noise_gen = torch.Generator(device=model.device).manual_seed(noise_seed)
        entries += fam.record(x_T, cond, uncond, scale, args.calib_steps,
                              args.calib_eta, args.calib_sampler, spacing, noise_gen, progress=not args.no_progress)
    uncond_context = None if not conditional else fam.uncond(1).float().cpu()
    timesteps = fam.sampling_timesteps(args.calib_steps, args.calib_sampler, spacing)
    return entries, labels_all, timesteps, fam, uncond_context


def fresh_draw(fam, args, gen, cond, uncond):
    """draw(k) of a batch's fresh run for step k: new x_T and sampler noise; the batch's classes or prompts are kept
    (as TFMQ-DM keeps its classes at every step)."""
    def draw(_k):
        x_T = torch.randn((args.calib_batch, *fam.latent_shape), generator=gen).to(fam.model.device)
        noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
        return x_T, cond, uncond, torch.Generator(device=fam.model.device).manual_seed(noise_seed)
    return draw


def cost_line(args, n_steps):
    """What --calib_data costs, in sampling steps (UNet calls; a guided call counts once)."""
    from quant.calib_fresh import unet_calls

    one = n_steps + (1 if args.calib_sampler == "plms" else 0)
    if args.calib_data == "trajectory":
        return f"calib_data trajectory: {one * args.calib_batches} UNet calls ({one} per batch)"
    calls = unet_calls(n_steps, args.calib_sampler)
    return (f"calib_data fresh_per_step: {n_steps} fresh runs per batch, {calls * args.calib_batches} UNet calls "
            f"({calls} per batch, {calls / one:.1f}x one trajectory's {one})")


def main(argv=None):
    args = resolve(build_parser().parse_args(argv), "calib", CONSTANTS)
    selection = check_args(args)
    prepare_run_dir(args)
    model, ident = load_fp_model(args)
    cost = cost_line(args, len(adapter(model).sampling_timesteps(args.calib_steps, args.calib_sampler,
                                                                 skip_type(args))))
    print(cost, flush=True)
    prompts, record = (None, None) if selection is None else selection
    entries, labels, timesteps, fam, uncond_context = collect(model, args, None if prompts is None
                                                              else prompts.prompts)
    if not entries:
        raise UserError("No UNet calls were recorded; the sampler did not reach the model's UNet.")
    payload = {"x": torch.cat([e["x"] for e in entries]).float(), "t": torch.cat([e["t"] for e in entries]).long()}
    if entries[0]["context"] is not None:
        payload["context"] = torch.cat([e["context"] for e in entries]).float()
        payload["uncond_context"] = uncond_context
    conditional = fam.conditioning != "none"
    meta = {**ident, "stage": "calib", "family": fam.family, "conditioning": fam.conditioning,
            "sampler": args.calib_sampler, "calib_steps": args.calib_steps, "calib_eta": args.calib_eta,
            "calib_scale": args.calib_scale if conditional else 1.0, "calib_batch": args.calib_batch,
            "calib_batches": args.calib_batches, "seed": args.seed, "calib_timesteps": timesteps,
            "classes": labels, "class_conditional": fam.conditioning == "class", "n_entries": len(entries),
            "rows_per_entry": int(entries[0]["x"].shape[0]), "n_tuples": int(payload["x"].shape[0]),
            "calib_data": args.calib_data}
    if fam.family == "pixel":
        meta["skip_type"] = skip_type(args)
    if record is not None:
        meta["calib_prompts"] = record
    path = artifact_path(args, "calib")
    save_artifact(path, meta, **payload)
    print(f"wrote {path}: {meta['n_tuples']} calibration tuples from {len(entries)} sampling steps"
          + (f" of {len(prompts.prompts)} calibration prompts" if prompts is not None else "") + f"; {cost}")
    return path


if __name__ == "__main__":
    cli_main(main)
