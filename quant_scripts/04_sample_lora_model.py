"""Stage 4: sample from the fine-tuned (or, with --stage naive, the naive) quantized model -> run_dir/samples.npz.

Same sampling flags and output contract as scripts/sample_diffusion.py and scripts/txt2img.py (the one loop,
ldm.generate.generate_samples: a uint8 .npz with labels / prompts and a JSON meta, written in resumable shards, shared
by torchrun processes; x_T of image i depends only on --seed and i, so FP and quantized runs share their initial
noise). Per family: class-conditional LDMs balance the classes; text LDMs sample a prompt set (--prompts, a seeded
selection of --n_prompts, --images_per_prompt each; image i has prompt i // images_per_prompt) and also write
PNGs and a prompt list beside the .npz; pixel models sample in pixel space (generalized_steps). The quantized UNet
picks its per-step activation scales by timestep value, so the sampling schedule must be the trained one or a
subset of it (e.g. a 100-step model sampled with 20 steps keeps every 5th entry).

Sources of the quantized UNet: a run_dir artifact (--stage), a packed export (--from_export, 06), an engine model
(--engine openvino PATH, 07), or --fp: the FP UNet behind a no-op quantized wrapper (an all-FP layer policy: no
quantizer anywhere), swapped in exactly like a quantized model, so an FP run of this script equals
scripts/txt2img.py / scripts/sample_diffusion.py bit for bit.
"""
import os

# _common first: it puts the repository root on sys.path
from _common import (A_BITS, DDIM_ETA, MADE_BY, SEED, W_BITS, add_stage_flag, agree, artifact_path, build_student,
                     check_ident, check_model_files, distinct, family, load_fp_model, load_quantized_artifact,
                     model_config, parser, prepare_output, prepare_run_dir, schedule_for, skip_type, unet_skeleton)
from ldm import cli
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
ENGINES = ("openvino",)


def build_parser():
    p = parser(__doc__, CONSTANTS)
    add_stage_flag(p, "sample from")
    p.add_argument("--from_export", default=None, metavar="PATH",
                   help="sample from a packed export (06_export_packed.py) instead of a run_dir artifact; the "
                        "file alone defines the quantized UNet (the FP checkpoint gives the autoencoder and "
                        "conditioning)")
    p.add_argument("--engine", nargs=2, default=None, metavar=("KIND", "PATH"),
                   help="sample from an engine model written by 07_deploy.py: KIND openvino, PATH its unet.xml")
    p.add_argument("--engine_streams", type=cli.positive_int, default=1,
                   help="with --engine: OpenVINO CPU streams (1: latency mode, each UNet call on all threads; n > 1: "
                        "the batch cut into n slices that run at once on n streams sharing the weights, the threads "
                        "divided among them; faster for small UNets on several cores, see results/engine_speed.md)")
    p.add_argument("--fp", action="store_true",
                   help="sample the FP model through this script's path (a no-op quantized wrapper): the reference "
                        "run of a comparison; no artifact is read")
    p.add_argument("--out", default=None, help="output .npz (default: run_dir/samples.npz)")
    p.add_argument("--sampler", choices=["ddim", "plms"], default=None,
                   help="sampler (default: the preset's; pixel models: ddim)")
    p.add_argument("--ddim_steps", type=cli.positive_int, default=None,
                   help="sampling steps (default: the quantized model's schedule; must be a subset of it)")
    p.add_argument("--eta", type=DDIM_ETA, default=None, help="DDIM eta in [0, 1] (default: the preset's)")
    p.add_argument("--scale", type=cli.nonneg_float, default=None,
                   help="classifier-free guidance scale (default: the preset's; ignored for unconditional models)")
    p.add_argument("--n_samples", type=cli.positive_int, default=None,
                   help="number of images (default: the preset's; text models: --n_prompts x --images_per_prompt)")
    p.add_argument("--batch_size", type=cli.positive_int, default=None,
                   help="images per sampling batch (default: the preset's)")
    p.add_argument("--seed", type=SEED, default=None, help="noise seed (x_T of image i from seed*1000003+i)")
    p.add_argument("--classes", type=cli.nonneg_int, nargs="+", default=None,
                   help="class ids to balance over (class-conditional models; default: all classes)")
    t = p.add_argument_group("text models")
    t.add_argument("--prompts", default=None, metavar="SOURCE",
                   help="evaluation prompts: a COCO captions JSON (e.g. captions_val2014.json), a text file with one "
                        "prompt per line, or digits-train / digits-heldout (default: the preset's)")
    t.add_argument("--n_prompts", type=cli.positive_int, default=None,
                   help="a seeded selection of this many prompts (default: the preset's, e.g. 10,000 for sd-v1-4; "
                        "all prompts in file order when it has none)")
    t.add_argument("--prompt_seed", type=SEED, default=None, help="seed of the --n_prompts selection (default 0)")
    t.add_argument("--images_per_prompt", type=cli.positive_int, default=None,
                   help="images per prompt (default: the preset's)")
    p.add_argument("--shard_size", type=cli.positive_int, default=None,
                   help="images per resumable shard (default 4 batches)")
    p.add_argument("--max_shards", type=cli.positive_int, default=None,
                   help="at most this many new shards in this run (time-boxed jobs; re-run to continue)")
    p.add_argument("--keep_shards", action="store_true", help="keep the shard directory after merging")
    p.add_argument("--method", choices=["efficientdm", "mpqdm", "mpqdm+"], help="must match the artifact if given")
    p.add_argument("--n_bits_w", type=W_BITS, help="must match the artifact if given")
    p.add_argument("--n_bits_a", type=A_BITS, help="must match the artifact if given")
    return p


def check_args(args):
    """Cross-flag rules, from the flags and the model config alone (before any model is loaded); returns (output
    path, the per-image prompts of a text preset or None, their selection record)."""
    from ldm.presets import get_preset

    preset = get_preset(args.preset)
    model_config(args)  # readable, and its targets allowed
    out = args.out or artifact_path(args, "samples")
    if not out.endswith(".npz"):
        raise UserError(f"--out {out} must name a .npz file.")
    sources = [name for name, given in (("--from_export", args.from_export), ("--engine", args.engine),
                                        ("--fp", args.fp)) if given]
    if len(sources) > 1:
        raise UserError(f"{sources[0]} and {sources[1]} name two models; give one of them.")
    if args.from_export and not os.path.isfile(args.from_export):
        raise UserError(f"--from_export {args.from_export} does not exist; write it with "
                        "quant_scripts/06_export_packed.py.")
    if args.engine and args.engine[0] not in ENGINES:
        raise UserError(f"--engine takes KIND PATH with KIND one of {', '.join(ENGINES)}, got {args.engine[0]!r}.")
    if args.engine_streams > 1 and not args.engine:
        raise UserError("--engine_streams applies to an engine model; give --engine openvino PATH with it.")
    sampler = args.sampler or preset.sampler
    if sampler == "plms" and args.eta not in (None, 0.0):
        raise UserError(f"the PLMS sampler is deterministic and needs --eta 0, got {args.eta}.")
    if preset.family == "pixel" and sampler != "ddim":
        raise UserError(f"pixel models sample with DDIM (generalized_steps), not --sampler {sampler}.")
    text_flags = [f for f in ("prompts", "n_prompts", "prompt_seed", "images_per_prompt")
                  if getattr(args, f) is not None]
    if preset.cond_kind != "class" and args.classes is not None:
        raise UserError(f"--classes applies to class-conditional models; preset {args.preset} is not one.")
    if preset.cond_kind == "text":
        check_model_files(args)  # the model's files before the prompt files
    if preset.cond_kind != "text":
        if text_flags:
            raise UserError(f"--{text_flags[0]} applies to text models; preset {args.preset} is not conditioned on "
                            "text.")
        return out, None, None
    if args.n_samples is not None:
        raise UserError("a text model samples --n_prompts prompts x --images_per_prompt images; drop --n_samples.")
    from ldm.data.prompts import load_prompts, select_prompts

    source = args.prompts or preset.prompts
    if source is None:
        raise UserError(f"preset {args.preset} needs --prompts: a COCO captions JSON such as captions_val2014.json, "
                        "or a text file with one prompt per line.")
    n = args.n_prompts if args.n_prompts is not None else preset.n_prompts
    selection = select_prompts(load_prompts(source), n, args.prompt_seed or 0, str(source))
    per = args.images_per_prompt or preset.images_per_prompt
    record = {k: v for k, v in selection.meta().items() if k != "indices"}  # meta goes into every shard
    record.update(images_per_prompt=per, order="image i: prompt i // images_per_prompt",
                  indices_sha256=_sha256(selection.indices))
    return out, [p for p in selection.prompts for _ in range(per)], record


def _sha256(obj):
    import hashlib
    import json
    return hashlib.sha256(json.dumps(obj).encode("utf-8")).hexdigest()


def check_schedule(args, steps, have, what, per_step=True):
    """The sampling schedule of ``steps`` steps must be the trained one or a subset of it (the temporal
    activation scales are keyed by distinct timestep value; a model without them, such as Q-Diffusion's, runs any
    schedule); returns it (with any repeated values)."""
    wanted = schedule_for(args, steps, "--ddim_steps")
    if per_step and not set(wanted) <= set(have):
        raise UserError(f"--ddim_steps {steps} visits timesteps the {what} has no scales for; it was trained on "
                        f"{len(have)} distinct timesteps, so sample with its own schedule or a subset of it.")
    return wanted


def default_steps(args, meta):
    """The artifact's own number of steps (train_steps), else the preset's if its schedule is covered, else the
    number of table entries."""
    from ldm.presets import get_preset

    if meta.get("train_steps"):
        return int(meta["train_steps"])
    have, preset_steps = set(meta["timesteps"]), get_preset(args.preset).ddim_steps
    try:
        if set(schedule_for(args, preset_steps, "--ddim_steps")) <= have:
            return preset_steps
    except UserError:
        pass
    return len(meta["timesteps"])


def sampling_schedule(qunet, wanted):
    """The quantized UNet with its temporal scales cut to the distinct ``wanted`` timesteps (unchanged if equal)."""
    from quant.api import convert_schedule

    wanted = distinct(wanted)
    if not qunet.per_step or wanted == list(qunet.table.timesteps):
        return qunet
    return convert_schedule(qunet, wanted)


def read_packed_header(args):
    """(header, meta in artifact terms) of the packed export, read before any model is loaded."""
    from quant.export import read_header

    path = os.path.abspath(args.from_export)
    header = read_header(path)
    try:
        meta = {"method": header["method"], "n_bits_w": header["w_bits"], "n_bits_a": header["a_bits"],
                "timesteps": [int(t) for t in header["timesteps"]],
                "trd_mode": header.get("config", {}).get("trd_mode", "off")}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"The header of the packed export {path} lacks the method, bits or timesteps; export it "
                        "again with quant_scripts/06_export_packed.py.") from None
    return header, meta


def load_packed(args, model, ident, header):
    """QuantUNet from the packed file, which must match the FP model."""
    from quant.export import load_export

    path = os.path.abspath(args.from_export)
    extra = header.get("extra", {})
    if extra.get("config_hash") not in (None, ident["config_hash"]):
        raise UserError(f"{path} was exported from a model with config hash {extra.get('config_hash')}, but "
                        f"--preset {args.preset} has {ident['config_hash']}.")
    # built from the config on the meta device: the float weights of the quantized layers never exist
    return load_export(path, unet_skeleton(args, header), device=model.device)


def load_engine(args, ident):
    """(engine UNet, meta in artifact terms) of an engine model (07_deploy.py), which must match the FP model."""
    from quant.deploy.openvino import load_engine_unet

    path = os.path.abspath(args.engine[1])
    qunet = load_engine_unet(path, threads=args.threads, streams=args.engine_streams)
    meta = qunet.meta()
    if not meta.get("timesteps"):
        raise UserError(f"The engine model {path} records no timestep schedule; deploy it again with "
                        "quant_scripts/07_deploy.py.")
    if meta.get("config_hash") != ident["config_hash"]:
        raise UserError(f"{path} was deployed from a model with config hash {meta.get('config_hash')}, but --preset "
                        f"{args.preset} has {ident['config_hash']}.")
    return qunet, meta


def fp_wrapper(model, timesteps):
    """The FP UNet behind a QuantUNet with an all-FP layer policy (no quantizer anywhere): same call path."""
    from quant.api import make_config, quantize_
    from quant.policy import model_family, rule

    unet = model.model.diffusion_model
    policy = {"family": model_family(unet), "rules": [rule("*", fp=True)]}
    return quantize_(unet, make_config("efficientdm", quantize_attention_matmuls=False), timesteps, policy)


def main(argv=None):
    from ldm.generate import export_images, generate_samples
    from ldm.pipelines import evaluation_overlap
    from ldm.presets import get_preset

    args = build_parser().parse_args(argv)
    out, prompts, prompt_record = check_args(args)
    preset = get_preset(args.preset)
    prepare_run_dir(args)
    prepare_output(out)
    art = header = None
    if args.fp:
        meta, source, parent = {"method": "fp", "n_bits_w": 32, "n_bits_a": 32}, "fp", {}
    elif args.from_export:
        header, meta = read_packed_header(args)
        source, parent = os.path.abspath(args.from_export), header.get("extra", {}).get("parent", {})
    elif args.engine:
        meta, source, parent = None, os.path.abspath(args.engine[1]), {}
    else:
        args.stage, art = load_quantized_artifact(args)
        meta, source = art["meta"], os.path.abspath(artifact_path(args, args.stage))
        parent = {args.stage: meta["checksum"]}
    if meta is not None and not args.fp:
        agree(args, meta, {"method": "method", "n_bits_w": "n_bits_w", "n_bits_a": "n_bits_a"}, "quantized model")
        steps = args.ddim_steps if args.ddim_steps is not None else default_steps(args, meta)
        wanted = check_schedule(args, steps, list(meta["timesteps"]), "quantized model", meta.get("per_step", True))
    overlap = evaluation_overlap((meta or {}).get("calib_prompts"), prompts or [])
    if overlap and not meta["calib_prompts"].get("allow_overlap"):
        raise UserError(f"{overlap} of the evaluation prompts are calibration prompts of this model; choose the "
                        "evaluation selection that stage 01 kept out (--prompts, --n_prompts, --prompt_seed as "
                        "01's --eval_prompts, --eval_n_prompts, --prompt_seed).")

    model, ident = load_fp_model(args)
    if args.fp:
        steps = args.ddim_steps if args.ddim_steps is not None else preset.ddim_steps
        wanted = schedule_for(args, steps, "--ddim_steps")
        qunet = fp_wrapper(model, wanted)
        meta["config_hash"] = ident["config_hash"]
    elif args.engine:
        qunet, meta = load_engine(args, ident)
        agree(args, meta, {"method": "method", "n_bits_w": "n_bits_w", "n_bits_a": "n_bits_a"}, "engine model")
        steps = args.ddim_steps if args.ddim_steps is not None else default_steps(args, meta)
        wanted = check_schedule(args, steps, list(meta["timesteps"]), "engine model")
    elif args.from_export:
        qunet = load_packed(args, model, ident, header)
        meta["config_hash"] = ident["config_hash"]
    else:
        check_ident(art, ident, args.stage, source)
        qunet = build_student(model, meta, art["state_dict"], copy_unet=False, what=f"{args.stage} artifact {source}",
                              made_by=MADE_BY[args.stage])
        del art
    if not args.engine:  # the engine's step table covers any subset of its schedule
        qunet = sampling_schedule(qunet, wanted)
    qunet.eval()
    model.model.diffusion_model = qunet

    defaults = preset.sampling_defaults()
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    stage = "fp" if args.fp else "export" if args.from_export else "engine-openvino" if args.engine else args.stage
    extra = {"quant_stage": stage, "quant_method": meta["method"], "n_bits_w": meta["n_bits_w"],
             "n_bits_a": meta["n_bits_a"], "trd_mode": meta.get("trd_mode", "off"), "preset": args.preset,
             "config_hash": meta["config_hash"], "quant_artifact": source, "quant_parent": parent}
    if prompts is not None:
        extra.update(prompt_selection=prompt_record, calibration_overlap=overlap)
    written = generate_samples(model, out, n_samples=None if prompts is not None else pick("n_samples"),
                               batch_size=pick("batch_size"), ddim_steps=steps, eta=pick("eta"), scale=pick("scale"),
                               seed=args.seed if args.seed is not None else CONSTANTS["seed"],
                               sampler=args.sampler or preset.sampler, classes=args.classes,
                               shard_size=args.shard_size, meta=extra, progress=not args.no_progress,
                               max_shards=args.max_shards, keep_shards=args.keep_shards, prompts=prompts,
                               skip_type=skip_type(args) if family(args) == "pixel" else None)
    if written is None:
        print(f"shards written under {out}.shards; re-run the same command to finish {out}")
        return None
    if prompts is not None and int(os.environ.get("RANK", "0")) == 0:
        stem = out[:-4]
        export_images(written, stem + "_png", stem + "_prompts.txt")
    print(f"wrote {written}")
    return written


if __name__ == "__main__":
    cli_main(main)
