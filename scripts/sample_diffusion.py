#!/usr/bin/env python
"""Full-precision sampling of a latent diffusion model or a pixel-space DDIM model into an ADM-format .npz (plus a
PNG grid beside it). Text-to-image models are sampled by scripts/txt2img.py (the same loop, ldm.generate).

Class-conditional models are sampled with classifier-free guidance, balanced over the classes; unconditional
models ignore --scale. Pixel presets (cifar10, digits-pixel) sample with generalized_steps over their quad / uniform
sequence. Samples are written in resumable shards: rerunning the same command after an
interruption continues where it stopped. Under `torchrun --nproc_per_node K` the shards are shared by K
processes and the result is identical to a one-process run.

Examples:
  python scripts/sample_diffusion.py --preset digits --out samples/digits_fp.npz
  python scripts/sample_diffusion.py --preset cin256-v2 --n_samples 50000 --out samples/cin_fp.npz
  torchrun --nproc_per_node 8 scripts/sample_diffusion.py --preset cifar10 --out samples/cifar_fp.npz
  python scripts/sample_diffusion.py --config my.yaml --ckpt my.ckpt --scale 1.0 --out samples/x.npz
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm import cli  # noqa: E402
from ldm.util import UserError, cli_main  # noqa: E402

SEED = cli.int_in(0, 2 ** 32 - 1)  # x_T seeds are seed * 1000003 + i, which must stay inside torch's seed range
DEFAULTS = dict(sampler="ddim", ddim_steps=20, eta=0.0, scale=1.0, n_samples=1000, batch_size=50)  # --config runs


def build_parser():
    from ldm.presets import PRESETS

    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (a preset, or --config with --ckpt)")
    src.add_argument("--preset", choices=list(PRESETS),
                     help=f"named model: {', '.join(PRESETS)}; also sets the paper's sampling defaults")
    src.add_argument("--config", help="model YAML (CompVis format), used with --ckpt")
    src.add_argument("--ckpt", help="checkpoint (.ckpt Lightning container, .pt state dict or .safetensors)")
    src.add_argument("--use_ema", action="store_true", help="sample with the checkpoint's EMA weights")
    src.add_argument("--trust_config", action="store_true",
                     help="allow a --config whose targets lie outside the toolkit's packages and torch (a config's "
                          "target is imported and called: use only for configs you trust)")
    s = p.add_argument_group("sampling (defaults: the preset's, else DDIM 20, eta 0, scale 1)")
    s.add_argument("--n_samples", type=cli.positive_int,
                   help="number of images (balanced over the classes if conditional)")
    s.add_argument("--batch_size", type=cli.positive_int,
                   help="images per sampler call (the UNet sees twice this with CFG)")
    s.add_argument("--ddim_steps", type=cli.positive_int,
                   help="number of sampling steps (uniform timestep spacing that must fit the model's schedule)")
    s.add_argument("--eta", type=cli.float_in(0.0, 1.0),
                   help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like noise (PLMS needs 0)")
    s.add_argument("--scale", type=cli.nonneg_float,
                   help="classifier-free guidance scale (1 = none; ignored if unconditional)")
    s.add_argument("--sampler", choices=["ddim", "plms"], help="DDIM or PLMS")
    s.add_argument("--seed", type=SEED, default=0, help="seed base: image i starts from noise seeded seed*1000003+i")
    s.add_argument("--classes", type=cli.nonneg_int, nargs="+",
                   help="restrict to these class ids (default: all classes)")
    s.add_argument("--shard_size", type=cli.positive_int, help="images per resumable shard (default: 4 batches)")
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, arr_1 labels, meta); a _grid.png "
                                                 "is written beside it")
    p.add_argument("--device", type=cli.device, default=None,
                   help="torch device: cuda (the current GPU), cuda:N, cpu or mps (default: cuda if available, "
                        "else cpu)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    """Cross-flag rules, from the flags and the model config alone (before any model is loaded); returns
    (config or None, sampling options)."""
    from omegaconf import OmegaConf

    from ldm.generate import uniform_schedule
    from ldm.presets import get_preset
    from ldm.util import check_config_targets

    if args.preset:
        if args.config or args.ckpt:
            raise UserError("give either --preset or --config with --ckpt, not both")
        preset = get_preset(args.preset)
        if preset.cond_kind == "text":
            raise UserError(f"preset {args.preset} is a text-to-image model; sample it with scripts/txt2img.py")
        config_path, defaults = preset.config_path, preset.sampling_defaults()
        if preset.family == "pixel":
            return None, _pixel_options(args, preset, defaults)
    else:
        if not (args.config and args.ckpt):
            raise UserError("give --preset NAME, or both --config and --ckpt")
        config_path, defaults = args.config, DEFAULTS
    if not os.path.isfile(config_path):
        raise UserError(f"config {config_path} not found")
    try:
        config = OmegaConf.load(config_path)
        timesteps = int(config.model.params.get("timesteps", 1000))
    except Exception as err:
        raise UserError(f"config {config_path} is not a readable LDM config ({type(err).__name__})") from None
    check_config_targets(config.model, args.trust_config)
    opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    uniform_schedule(opts["ddim_steps"], timesteps, "--ddim_steps")
    if opts["sampler"] == "plms" and opts["eta"] != 0:
        raise UserError(f"the PLMS sampler is deterministic and needs --eta 0, got {opts['eta']}")
    if not args.out.endswith(".npz"):
        raise UserError(f"--out {args.out} must name a .npz file")
    return (config if not args.preset else None), opts


def _pixel_options(args, preset, defaults):
    """Sampling options of a pixel preset, checked against its ddim config (generalized_steps; no guidance)."""
    from ddim.config import load_config
    from ddim.runners.diffusion import timestep_sequence

    total = int(load_config(preset.config_path).diffusion.num_diffusion_timesteps)
    opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    if opts["sampler"] != "ddim":
        raise UserError(f"pixel models sample with DDIM (generalized_steps), not --sampler {opts['sampler']}")
    if args.classes:
        raise UserError(f"preset {args.preset} is unconditional; drop --classes")
    timestep_sequence(preset.skip_type, opts["ddim_steps"], total)  # a UserError when the steps do not fit
    if not args.out.endswith(".npz"):
        raise UserError(f"--out {args.out} must name a .npz file")
    return opts


def main(argv=None):
    args = parse_args(argv)
    from ldm.generate import generate_samples
    from ldm.presets import get_preset, load_preset_model
    from ldm.util import ensure_writable_dir, load_model_from_config, resolve_device

    config, opts = check_args(args)
    ensure_writable_dir(os.path.dirname(os.path.abspath(args.out)), "output directory")
    device = resolve_device(args.device)
    preset = get_preset(args.preset) if args.preset else None
    if args.preset:
        model = load_preset_model(args.preset, device)
        source = {"preset": preset.name, "config": preset.config, "ckpt": preset.ckpt}
    else:
        model = load_model_from_config(config, args.ckpt, use_ema_weights=args.use_ema, device=device,
                                       trust_config=args.trust_config)
        source = {"config": os.path.abspath(args.config), "ckpt": os.path.abspath(args.ckpt)}
    out = generate_samples(model, args.out, n_samples=opts["n_samples"], batch_size=opts["batch_size"],
                           ddim_steps=opts["ddim_steps"], eta=opts["eta"], scale=opts["scale"], seed=args.seed,
                           sampler=opts["sampler"], classes=args.classes, shard_size=args.shard_size,
                           meta={"source": source, "precision": "fp32"}, progress=not args.no_progress,
                           skip_type=preset.skip_type if args.preset and preset.family == "pixel" else None)
    if int(os.environ.get("RANK", "0")) == 0 and out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    cli_main(main)
