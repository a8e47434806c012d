#!/usr/bin/env python
"""Full-precision sampling of a latent diffusion model into an ADM-format .npz (plus a PNG grid beside it).

Class-conditional models are sampled with classifier-free guidance, balanced over the classes; unconditional
models ignore --scale. Samples are written in resumable shards: rerunning the same command after an
interruption continues where it stopped. Under `torchrun --nproc_per_node K` the shards are shared by K
processes and the result is identical to a one-process run.

Examples:
  python scripts/sample_diffusion.py --preset digits --out samples/digits_fp.npz
  python scripts/sample_diffusion.py --preset cin256-v2 --n_samples 50000 --out samples/cin_fp.npz
  python scripts/sample_diffusion.py --config my.yaml --ckpt my.ckpt --scale 1.0 --out samples/x.npz
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.util import UserError, cli_main  # noqa: E402


def build_parser():
    from ldm.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (a preset, or --config with --ckpt)")
    src.add_argument("--preset", help=f"named model: {', '.join(PRESETS)}; also sets the paper's sampling defaults")
    src.add_argument("--config", help="model YAML (CompVis format), used with --ckpt")
    src.add_argument("--ckpt", help="checkpoint (.ckpt Lightning container, .pt state dict or .safetensors)")
    src.add_argument("--use_ema", action="store_true", help="sample with the checkpoint's EMA weights")
    s = p.add_argument_group("sampling (defaults: the preset's, else DDIM 20, eta 0, scale 1)")
    s.add_argument("--n_samples", type=int, help="number of images (balanced over the classes if conditional)")
    s.add_argument("--batch_size", type=int, help="images per sampler call (the UNet sees twice this with CFG)")
    s.add_argument("--ddim_steps", type=int, help="number of sampling steps (uniform timestep spacing)")
    s.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 DDPM-like noise (PLMS needs 0)")
    s.add_argument("--scale", type=float, help="classifier-free guidance scale (1 = none; ignored if unconditional)")
    s.add_argument("--sampler", choices=["ddim", "plms"], help="DDIM or PLMS")
    s.add_argument("--seed", type=int, default=0, help="seed base: image i starts from noise seeded seed*1000003+i")
    s.add_argument("--classes", type=int, nargs="+", help="restrict to these class ids (default: all classes)")
    s.add_argument("--shard_size", type=int, help="images per resumable shard (default: 4 batches)")
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, arr_1 labels, meta); a _grid.png "
                                                 "is written beside it")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from omegaconf import OmegaConf

    from ldm.generate import generate_samples
    from ldm.presets import get_preset, load_preset_model
    from ldm.util import default_device, load_model_from_config

    device = default_device(args.device)
    if args.preset:
        if args.config or args.ckpt:
            raise UserError("give either --preset or --config with --ckpt, not both")
        preset = get_preset(args.preset)
        defaults = preset.sampling_defaults()
        model = load_preset_model(args.preset, device)
        source = {"preset": preset.name, "config": preset.config, "ckpt": preset.ckpt}
    else:
        if not (args.config and args.ckpt):
            raise UserError("give --preset NAME, or both --config and --ckpt")
        if not os.path.isfile(args.config):
            raise UserError(f"config {args.config} not found")
        defaults = dict(sampler="ddim", ddim_steps=20, eta=0.0, scale=1.0, n_samples=1000, batch_size=50)
        model = load_model_from_config(OmegaConf.load(args.config), args.ckpt, use_ema_weights=args.use_ema,
                                       device=device)
        source = {"config": os.path.abspath(args.config), "ckpt": os.path.abspath(args.ckpt)}
    opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    out = generate_samples(model, args.out, n_samples=opts["n_samples"], batch_size=opts["batch_size"],
                           ddim_steps=opts["ddim_steps"], eta=opts["eta"], scale=opts["scale"], seed=args.seed,
                           sampler=opts["sampler"], classes=args.classes, shard_size=args.shard_size,
                           meta={"source": source, "precision": "fp32"}, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0 and out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    cli_main(main)
