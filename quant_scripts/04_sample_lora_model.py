"""Stage 4: sample from the fine-tuned (or, with --stage naive, the naive) quantized model -> run_dir/samples.npz.

Same sampling flags and output contract as scripts/sample_diffusion.py (ldm.generate.generate_samples: an
ADM-format uint8 .npz with labels and a JSON meta, written in resumable shards; x_T of image i depends only on
--seed and i, so FP and quantized runs share their initial noise). The quantized UNet picks its per-step
activation scales by timestep value, so the sampling schedule must be the trained one or a subset of it
(e.g. a 100-step model sampled with 20 steps keeps every 5th entry).
"""
import os

# _common first: it puts the repository root on sys.path
from _common import agree, artifact_path, build_student, load_fp_model, load_stage_artifact, parser, unet_config
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.util import UserError, cli_main

# ---- constants: MPQ-DM ImageNet evaluation defaults; None = the preset's sampling defaults ----
CONSTANTS = {
    "sampler": "ddim",
    "ddim_steps": None,     # None: the quantized model's own schedule (ImageNet 20)
    "eta": None,            # None: preset (ImageNet 0.0)
    "scale": None,          # None: preset (ImageNet 3.0)
    "n_samples": None,      # None: preset (ImageNet 50,000 = 50 per class)
    "batch_size": None,     # None: preset (50)
    "seed": 0,
}


def build_parser():
    p = parser(__doc__, CONSTANTS)
    p.add_argument("--stage", choices=["finetuned", "naive"], default="finetuned",
                   help="which quantized artifact to sample from (default: finetuned.pt)")
    p.add_argument("--from_export", default=None, metavar="PATH",
                   help="sample from a packed export (06_export_packed.py) instead of a run_dir artifact; the "
                        "file alone defines the quantized UNet (the FP checkpoint gives the autoencoder and "
                        "class embedder)")
    p.add_argument("--out", default=None, help="output .npz (default: run_dir/samples.npz)")
    p.add_argument("--sampler", choices=["ddim", "plms"], default=None, help="sampler (default ddim)")
    p.add_argument("--ddim_steps", type=int, default=None,
                   help="sampling steps (default: the quantized model's schedule; must be a subset of it)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the preset's)")
    p.add_argument("--scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the preset's; ignored for unconditional models)")
    p.add_argument("--n_samples", type=int, default=None, help="number of images (default: the preset's)")
    p.add_argument("--batch_size", type=int, default=None, help="images per sampling batch (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (x_T of image i from seed*1000003+i)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids to balance over (default: all classes)")
    p.add_argument("--shard_size", type=int, default=None, help="images per resumable shard (default 4 batches)")
    p.add_argument("--max_shards", type=int, default=None,
                   help="stop after this many new shards (time-boxed jobs; re-run to continue)")
    p.add_argument("--keep_shards", action="store_true", help="keep the shard directory after merging")
    p.add_argument("--method", choices=["efficientdm", "mpqdm", "mpqdm+"], help="must match the artifact if given")
    p.add_argument("--n_bits_w", type=int, help="must match the artifact if given")
    p.add_argument("--n_bits_a", type=int, help="must match the artifact if given")
    return p


def sampling_schedule(qunet, steps, num_timesteps):
    """Use the model's schedule, or convert the temporal scales to a subset schedule; else a UserError."""
    from quant.api import convert_schedule

    wanted = [int(v) for v in make_ddim_timesteps("uniform", steps, num_timesteps, verbose=False)]
    have = list(qunet.table.timesteps)
    if wanted == have:
        return qunet
    if not set(wanted) <= set(have):
        raise UserError(f"--ddim_steps {steps} visits timesteps the quantized model has no scales for; it was "
                        f"trained on {len(have)} steps, so use {len(have)} or a divisor schedule of it.")
    return convert_schedule(qunet, wanted)


def load_packed(args, model, ident):
    """(QuantUNet from the packed file, its meta in artifact terms, path); the file must match the FP model."""
    from quant.export import load_export, read_header

    path = os.path.abspath(args.from_export)
    header = read_header(path)
    extra = header.get("extra", {})
    if extra.get("config_hash") not in (None, ident["config_hash"]):
        raise UserError(f"{path} was exported from a model with config hash {extra.get('config_hash')}, but "
                        f"--preset {args.preset} has {ident['config_hash']}.")
    # built from the config on the meta device: the float weights of the quantized layers never exist
    qunet = load_export(path, unet_config(args), device=model.device)
    meta = {"method": header["method"], "n_bits_w": header["w_bits"], "n_bits_a": header["a_bits"],
            "timesteps": header["timesteps"], "trd_mode": header.get("config", {}).get("trd_mode", "off"),
            "config_hash": ident["config_hash"]}
    return qunet, meta, path


def main(argv=None):
    from ldm.generate import generate_samples
    from ldm.presets import get_preset

    args = build_parser().parse_args(argv)
    preset = get_preset(args.preset).sampling_defaults()
    model, ident = load_fp_model(args)
    if args.from_export:
        qunet, meta, source = load_packed(args, model, ident)
    else:
        art = load_stage_artifact(args, args.stage, ident)
        meta, source = art["meta"], os.path.abspath(artifact_path(args, args.stage))
        if meta.get("stage") != args.stage:
            raise UserError(f"{source} is a {meta.get('stage')!r} artifact, not {args.stage!r}.")
        qunet = build_student(model, meta, art["state_dict"], copy_unet=False)
        del art
    agree(args, meta, {"method": "method", "n_bits_w": "n_bits_w", "n_bits_a": "n_bits_a"}, "quantized model")
    steps = args.ddim_steps or len(meta["timesteps"])
    qunet = sampling_schedule(qunet, steps, model.num_timesteps)
    qunet.eval()
    model.model.diffusion_model = qunet

    out = args.out or artifact_path(args, "samples")
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    extra = {"quant_stage": "export" if args.from_export else args.stage, "quant_method": meta["method"],
             "n_bits_w": meta["n_bits_w"], "n_bits_a": meta["n_bits_a"], "trd_mode": meta.get("trd_mode", "off"),
             "preset": args.preset, "config_hash": meta["config_hash"], "quant_artifact": source}
    written = generate_samples(model, out, n_samples=pick("n_samples"), batch_size=pick("batch_size"),
                               ddim_steps=steps, eta=pick("eta"), scale=pick("scale"),
                               seed=args.seed if args.seed is not None else CONSTANTS["seed"],
                               sampler=pick("sampler"), classes=args.classes, shard_size=args.shard_size,
                               meta=extra, progress=not args.no_progress, max_shards=args.max_shards,
                               keep_shards=args.keep_shards)
    if written is None:
        print(f"shards written under {out}.shards; re-run the same command to finish {out}")
    else:
        print(f"wrote {written}")
    return written


if __name__ == "__main__":
    cli_main(main)
