#!/usr/bin/env python
"""Full-precision text-to-image sampling (CompVis txt2img): prompts -> an ADM-style .npz, PNGs and a prompt list.

Prompts come from --prompt (repeatable) or --from-file: a COCO captions JSON (annotations[*].caption), a text file
with one prompt per line, or `digits-train` / `digits-heldout` (the embedded model's phrasings); --n_prompts draws a
seeded selection (ldm.data.prompts.SELECTION_RULE). Each prompt gets --n_samples images; image i belongs to prompt
i // n_samples. Sampling is ldm.generate.generate_samples, the loop that quant_scripts/04_sample_lora_model.py uses
too: x_T[i] = randn(shape, generator=torch.Generator().manual_seed(seed * 1000003 + i)) on the CPU, resumable
shards, torchrun-aware; so 04 given the same prompts, seed and batch size reproduces these images bit for bit when
its model is at full precision (04 --fp). Classifier-free guidance uses "" as the unconditional prompt. Prompts
longer than 77 tokens are truncated by the CLIP tokenizer (start and end tokens kept); the images concerned are
listed in the meta (`truncated_images`).

Written to --outdir: samples.npz (arr_0 uint8 NHWC in image order; `prompts`: the prompt of each image; arr_1: the
digit of each prompt when every prompt is a digits phrasing, so `05_evaluate.py --extractor digits` reports prompt
accuracy; `meta`: the JSON settings), samples_grid.png (one row per prompt, first 10 prompts), samples/NNNNN.png and
prompts.txt (line i = prompt of image i). A rerun with the same arguments resumes from the finished shards; other
arguments are refused.

Examples:
  python scripts/txt2img.py --preset digits-txt2img --prompt "a handwritten seven" --n_samples 8 --outdir runs/t2i
  python scripts/txt2img.py --preset digits-txt2img --from-file digits-heldout --n_samples 25 --outdir runs/t2i_ho
  torchrun --nproc_per_node 8 scripts/txt2img.py --preset sd-v1-4 --from-file captions_val2014.json \\
      --n_prompts 10000 --outdir runs/sd
"""
import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm import cli  # noqa: E402
from ldm.util import UserError, cli_main  # noqa: E402

SEED = cli.int_in(0, 2 ** 32 - 1)  # x_T seeds are seed * 1000003 + i, which must stay inside torch's seed range
TEXT_PRESETS = ("digits-txt2img", "sd-v1-4")  # the text presets of ldm.presets
CONFIG_DEFAULTS = dict(sampler="plms", ddim_steps=50, eta=0.0, scale=7.5, batch_size=4)  # --config runs (SD's)
ORDER_RULE = "image i: prompt i // n_samples, its (i % n_samples)-th sample"


def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (a preset, or --config with --ckpt)")
    src.add_argument("--preset", choices=TEXT_PRESETS, help="named text-to-image model; also sets its sampling "
                                                            "defaults")
    src.add_argument("--config", help="model YAML (CompVis format), used with --ckpt")
    src.add_argument("--ckpt", help="checkpoint (.ckpt container, .pt state dict or .safetensors)")
    pr = p.add_argument_group("prompts")
    pr.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    pr.add_argument("--from-file", dest="from_file",
                    help="COCO captions JSON, text file (one prompt per line), digits-train or digits-heldout")
    pr.add_argument("--n_prompts", type=cli.positive_int,
                    help="use a seeded selection of this many prompts from --from-file (default: all, in order)")
    pr.add_argument("--prompt_seed", type=SEED, default=0, help="seed of the --n_prompts selection")
    s = p.add_argument_group("sampling (defaults: the preset's, else PLMS 50, eta 0, scale 7.5)")
    s.add_argument("--n_samples", type=cli.positive_int, default=1, help="images per prompt")
    s.add_argument("--batch_size", type=cli.positive_int,
                   help="images per sampler call (the UNet sees twice this with guidance); part of the result's "
                        "identity: a quantized run must use the same value to match bit for bit")
    s.add_argument("--sampler", choices=["plms", "ddim"], help="PLMS (needs eta 0) or DDIM")
    s.add_argument("--ddim_steps", type=cli.positive_int, help="number of sampling steps (uniform timestep spacing)")
    s.add_argument("--eta", type=cli.float_in(0.0, 1.0), help="DDIM eta in [0, 1]: 0 deterministic (PLMS needs 0)")
    s.add_argument("--scale", type=cli.nonneg_float, help='classifier-free guidance scale against the prompt "" '
                                                          "(1 = no guidance)")
    s.add_argument("--seed", type=SEED, default=0, help="image i starts from noise seeded seed*1000003+i")
    s.add_argument("--shard_size", type=cli.positive_int, help="images per resumable shard (default: 4 batches)")
    s.add_argument("--max_shards", type=cli.positive_int,
                   help="at most this many new shards in this run (time-boxed jobs; re-run to continue)")
    p.add_argument("--outdir", required=True, help="output folder (samples.npz, PNGs, prompts.txt, grid)")
    p.add_argument("--device", type=cli.device, default=None, help="torch device (default: cuda if available)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


# ------------------------------------------------------------------------------------------------ model
def model_source(args):
    """(config path, checkpoint path, source record, sampling defaults) from --preset or --config/--ckpt,
    checked before anything is loaded."""
    from ldm.presets import check_preset_files

    if args.preset:
        if args.config or args.ckpt:
            raise UserError("give either --preset or --config with --ckpt, not both")
        preset = check_preset_files(args.preset)
        defaults = {k: getattr(preset, k) for k in ("sampler", "ddim_steps", "eta", "scale", "batch_size")}
        return preset.config_path, preset.ckpt_path, {"preset": args.preset, "config": preset.config,
                                                       "ckpt": preset.ckpt}, defaults
    if not (args.config and args.ckpt):
        raise UserError("give --preset NAME, or both --config and --ckpt")
    if not os.path.isfile(args.config):
        raise UserError(f"config {args.config} not found; pass an existing model YAML")
    return args.config, args.ckpt, {"config": os.path.abspath(args.config), "ckpt": os.path.abspath(args.ckpt)}, \
        dict(CONFIG_DEFAULTS)


def load_model(args, config, ckpt, device):
    from ldm.pipelines import adapter_for
    from ldm.presets import get_preset, load_model as load

    clip_tokenizer = bool(args.preset) and get_preset(args.preset).clip_tokenizer
    model = load("ldm", config, ckpt, device=device, clip_tokenizer=clip_tokenizer)
    if adapter_for(model).conditioning != "text":
        raise UserError(f"{config} is not a text-conditioned model (cond_stage_key {model.cond_stage_key!r}); "
                        "use scripts/sample_diffusion.py for class-conditional or unconditional models")
    return model


# ---------------------------------------------------------------------------------------------- prompts
def gather_prompts(args):
    """(prompts, selection meta) from --prompt or --from-file (+ --n_prompts)."""
    from ldm.data.prompts import load_prompts, select_prompts

    if bool(args.prompt) == bool(args.from_file):
        raise UserError("give prompts with --prompt or with --from-file (one of the two)")
    if args.prompt:
        if args.n_prompts:
            raise UserError("--n_prompts selects from --from-file; with --prompt every given prompt is used")
        return list(args.prompt), {"source": "--prompt", "rule": "as given", "n": len(args.prompt)}
    prompts = load_prompts(args.from_file)
    source = args.from_file if not os.path.isfile(args.from_file) else os.path.abspath(args.from_file)
    selection = select_prompts(prompts, args.n_prompts, args.prompt_seed, source)
    meta = {k: v for k, v in selection.meta().items() if k != "indices"}  # the meta goes into every shard
    meta["indices_sha256"] = hashlib.sha256(json.dumps(selection.indices).encode("utf-8")).hexdigest()
    if os.path.isfile(args.from_file):
        with open(args.from_file, "rb") as fh:
            meta["sha256"] = hashlib.sha256(fh.read()).hexdigest()
    return selection.prompts, meta


def main(argv=None):
    args = build_parser().parse_args(argv)
    from ldm.generate import export_images, generate_samples
    from ldm.util import ensure_writable_dir, resolve_device

    prompts, prompt_meta = gather_prompts(args)  # prompt errors before the model is loaded
    config, ckpt, source, defaults = model_source(args)
    opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    if opts["sampler"] == "plms" and opts["eta"] != 0:
        raise UserError(f"the PLMS sampler is deterministic and needs eta 0, got eta {opts['eta']}")
    ensure_writable_dir(args.outdir, "output directory", clean=False)
    model = load_model(args, config, ckpt, resolve_device(args.device))
    image_prompts = [p for p in prompts for _ in range(args.n_samples)]
    out = os.path.join(args.outdir, "samples.npz")
    written = generate_samples(model, out, batch_size=opts["batch_size"], ddim_steps=opts["ddim_steps"],
                               eta=opts["eta"], scale=opts["scale"], seed=args.seed, sampler=opts["sampler"],
                               shard_size=args.shard_size, max_shards=args.max_shards, prompts=image_prompts,
                               meta={"source": source, "precision": "fp32", "prompt_selection": prompt_meta,
                                     "n_samples_per_prompt": args.n_samples, "image_order": ORDER_RULE},
                               progress=not args.no_progress)
    if written is None:
        print(f"shards written under {out}.shards; re-run the same command to finish {out}")
        return None
    if int(os.environ.get("RANK", "0")) == 0:
        export_images(written, os.path.join(args.outdir, "samples"), os.path.join(args.outdir, "prompts.txt"))
        from ldm.generate import read_npz_meta
        truncated = read_npz_meta(written)["truncated_images"]
        if truncated:
            print(f"{len(truncated)} images have a prompt longer than the tokenizer's 77 tokens, which was truncated "
                  "(listed in the meta as truncated_images)")
        print(f"wrote {len(image_prompts)} images to {written}")
    return written


if __name__ == "__main__":
    cli_main(main)
