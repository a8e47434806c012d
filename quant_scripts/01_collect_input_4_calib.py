"""Stage 1: record the FP UNet's inputs along DDIM sampling trajectories -> run_dir/calib.pt (MPQ-DM.md §2).

The model is not edited: LatentDiffusion.record_unet_inputs() hooks the UNet for the duration of sampling. The
file holds the flattened tuples x [N,...], t [N], context [N,...] (absent for unconditional models), entries
in sampling order with the uncond rows of each step first.
"""
import torch

# _common first: it puts the repository root on sys.path
from _common import artifact_path, class_info, load_fp_model, parser, resolve
from ldm.util import UserError, cli_main
from quant.artifacts import save_artifact

# ---- constants: MPQ-DM ImageNet defaults (each is also a flag; a --preset may override) ----
CONSTANTS = {
    "calib_steps": 250,      # DDIM steps of the recorded trajectory
    "calib_eta": 1.0,        # DDIM eta
    "calib_scale": 1.5,      # classifier-free guidance scale (ignored for unconditional models)
    "calib_batch": 8,        # B trajectories per batch (random classes); the UNet sees 2B rows with CFG
    "calib_batches": 1,      # number of such batches (ImageNet: 1 -> 2B*250 = 4000 tuples)
    "seed": 0,               # classes, x_T and per-step noise
}


def build_parser():
    p = parser(__doc__, CONSTANTS, "calib")
    p.add_argument("--calib_steps", type=int, help="DDIM steps of each recorded trajectory")
    p.add_argument("--calib_eta", type=float, help="DDIM eta of the recorded trajectories")
    p.add_argument("--calib_scale", type=float, help="classifier-free guidance scale while recording")
    p.add_argument("--calib_batch", type=int, help="trajectories per batch (random classes per trajectory)")
    p.add_argument("--calib_batches", type=int, help="number of batches to record")
    p.add_argument("--seed", type=int, help="seed of classes, x_T and sampler noise")
    return p


@torch.no_grad()
def collect(model, args):
    from ldm.models.diffusion.ddim import DDIMSampler

    conditional, n_classes, null_class = class_info(model)
    gen = torch.Generator().manual_seed(args.seed)
    shape = [int(model.channels), int(model.image_size), int(model.image_size)]
    sampler = DDIMSampler(model)
    entries, labels_all = [], []
    for _ in range(args.calib_batches):
        cond = uncond = None
        if conditional:
            labels = torch.randint(0, n_classes, (args.calib_batch,), generator=gen)
            labels_all += labels.tolist()
            key = model.cond_stage_key
            cond = model.get_learned_conditioning({key: labels.to(model.device)})
            uncond = model.get_learned_conditioning({key: torch.full_like(labels, null_class).to(model.device)})
        x_T = torch.randn((args.calib_batch, *shape), generator=gen).to(model.device)
        noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
        noise_gen = torch.Generator(device=model.device).manual_seed(noise_seed)
        with model.record_unet_inputs(uncond_context=uncond) as rec:
            sampler.sample(S=args.calib_steps, batch_size=args.calib_batch, shape=shape, conditioning=cond,
                           eta=args.calib_eta, x_T=x_T, unconditional_guidance_scale=args.calib_scale if conditional
                           else 1.0, unconditional_conditioning=uncond, verbose=False, generator=noise_gen,
                           progress=not args.no_progress)
        entries += rec.entries
    timesteps = [int(t) for t in sampler.ddim_timesteps]
    return entries, labels_all, timesteps, conditional


def main(argv=None):
    args = resolve(build_parser().parse_args(argv), "calib", CONSTANTS)
    if args.calib_steps < 1 or args.calib_batch < 1 or args.calib_batches < 1:
        raise UserError("--calib_steps, --calib_batch and --calib_batches must be positive.")
    model, ident = load_fp_model(args)
    entries, labels, timesteps, conditional = collect(model, args)
    if not entries:
        raise UserError("No UNet calls were recorded; the sampler did not reach the model's UNet.")
    payload = {"x": torch.cat([e["x"] for e in entries]).float(), "t": torch.cat([e["t"] for e in entries]).long()}
    if entries[0]["context"] is not None:
        payload["context"] = torch.cat([e["context"] for e in entries]).float()
    meta = {**ident, "stage": "calib", "sampler": "ddim", "calib_steps": args.calib_steps,
            "calib_eta": args.calib_eta, "calib_scale": args.calib_scale if conditional else 1.0,
            "calib_batch": args.calib_batch, "calib_batches": args.calib_batches, "seed": args.seed,
            "calib_timesteps": timesteps, "classes": labels, "class_conditional": conditional,
            "n_entries": len(entries), "rows_per_entry": int(entries[0]["x"].shape[0]),
            "n_tuples": int(payload["x"].shape[0])}
    path = artifact_path(args, "calib")
    save_artifact(path, meta, **payload)
    print(f"wrote {path}: {meta['n_tuples']} calibration tuples from {len(entries)} sampling steps")
    return path


if __name__ == "__main__":
    cli_main(main)
