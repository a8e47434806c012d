"""Helpers shared by the numbered quant_scripts: presets, flag resolution, model loading, artifact checks.

Flag precedence: an explicit flag > the preset's override (PRESET_STAGE_DEFAULTS) > the script's constants block
(the paper's ImageNet defaults). Flags therefore default to None in argparse and are resolved here.

Order of every script (so that a bad input ends with one sentence and nothing written): parse (each numeric flag
has an ldm.cli validator) -> resolve -> the script's ``check_args`` (cross-flag rules argparse cannot express, from
the model config alone) -> ``prepare_run_dir`` (writable, stale temporary files removed) -> load and check the
upstream artifacts (checksum, stage, parent) -> load the model -> work -> write one artifact.
"""
import argparse
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # scripts run as `python quant_scripts/0X_....py` from anywhere
    sys.path.insert(0, REPO_ROOT)

from ldm import cli  # noqa: E402
from ldm.util import UserError, check_config_targets, ensure_writable_dir  # noqa: E402
from quant.artifacts import (check_meta, check_parents, config_hash, load_artifact,  # noqa: E402
                             load_state_dict_checked)

PRESET_NAMES = ("cin256-v2", "lsun_beds256", "lsun_churches256", "digits", "cifar10", "digits-pixel", "sd-v1-4",
                "digits-txt2img")  # = ldm.presets.PRESETS (checked in tests), listed here so parsing imports nothing
SUPPORTED_W_BITS = (2, 3, 4, 5, 6, 7, 8)  # OMQ's b+1 group must fit 8 bits: MPQ-DM allows 2..7, EfficientDM 2..8
SUPPORTED_A_BITS = (2, 3, 4, 5, 6, 7, 8)
W_BITS = cli.int_in(min(SUPPORTED_W_BITS), max(SUPPORTED_W_BITS))  # type= of --n_bits_w
A_BITS = cli.int_in(min(SUPPORTED_A_BITS), max(SUPPORTED_A_BITS))
SEED = cli.int_in(0, 2 ** 32 - 1)  # torch seeds; derived seeds (seed * 1000003 + i, seed + epoch) stay in range
DDIM_ETA = cli.float_in(0.0, 1.0)  # 0 deterministic .. 1 DDPM-like; above 1 the DDIM direction term is undefined

# Per-preset overrides of the constants blocks (MPQ-DM.md §2, §9; digits: a small, few-minute CPU recipe).
_LSUN = {
    "calib": {"calib_steps": 100, "calib_eta": 1.0, "calib_scale": 1.0, "calib_batch": 8, "calib_batches": 1},
    "naive": {"n_calib": 256, "train_steps": 100},
    "finetune": {"epochs": 320, "batch_size": 4, "eta": 1.0, "scale": 1.0, "preview_every": 32},
}
PRESET_STAGE_DEFAULTS = {
    "cin256-v2": {"calib": {}, "naive": {}, "finetune": {}},
    "lsun_beds256": _LSUN,
    # no published recipe for churches: the bedrooms one (MPQ-DM.md §9 toolkit default)
    "lsun_churches256": _LSUN,
    "digits": {
        "calib": {"calib_steps": 50, "calib_eta": 1.0, "calib_scale": 1.5, "calib_batch": 8, "calib_batches": 1},
        "naive": {"n_calib": 32, "train_steps": 20},
        # ~0.2-1 s per iteration (B=8, W2A4, CPU): 16 epochs x 20 steps = 320 iterations, 1-5 minutes. LoRA lr 0.1x
        # the paper's: at this short budget 0.1x is far better for MPQ-DM and no worse for EfficientDM
        # (results/digits.md); at the paper's 800 epochs the paper's lr recovers (results/digits_budget.md), so a
        # long run should pass --lora_lr_scale 1. cin256-v2 and the other presets keep the paper's recipe
        "finetune": {"epochs": 16, "batch_size": 8, "eta": 0.0, "scale": 3.0, "preview_every": 8,
                     "preview_classes": [3, 8], "checkpoint_every": 4, "lora_lr_scale": 0.1},
    },
    # CIFAR-10 (TXT2IMG_CIFAR.md B.4): Q-Diffusion / TFMQ-DM calibrate on quad-100 eta-0 trajectories (no guidance);
    # the training and sampling schedule is quad-100 (96 distinct values: 96 per-step activation sets)
    "cifar10": {
        "calib": {"calib_steps": 100, "calib_eta": 0.0, "calib_scale": 1.0, "calib_batch": 32, "calib_batches": 8},
        "naive": {"n_calib": 256, "train_steps": 100},
        "finetune": {"epochs": 160, "batch_size": 16, "eta": 0.0, "scale": 1.0, "preview_every": 20},
    },
    "digits-pixel": {
        "calib": {"calib_steps": 20, "calib_eta": 0.0, "calib_scale": 1.0, "calib_batch": 16, "calib_batches": 1},
        "naive": {"n_calib": 32, "train_steps": 20},
        "finetune": {"epochs": 16, "batch_size": 8, "eta": 0.0, "scale": 1.0, "preview_every": 8,
                     "checkpoint_every": 4},
    },
    # SD v1.4 (TXT2IMG_CIFAR.md A.2): PLMS-50 trajectories at CFG 7.5 of 128 calibration captions (as TFMQ-DM's
    # 128 prompts), 12,800 rows of [4x64x64] + [77x768]; fine-tuning on uniform DDIM-50 (PLMS-50's timesteps)
    "sd-v1-4": {
        "calib": {"calib_sampler": "plms", "calib_steps": 50, "calib_eta": 0.0, "calib_scale": 7.5,
                  "calib_batch": 8, "calib_batches": 16},
        "naive": {"n_calib": 256, "train_steps": 50},
        "finetune": {"epochs": 160, "batch_size": 1, "eta": 0.0, "scale": 7.5, "preview_every": 20},
    },
    "digits-txt2img": {
        "calib": {"calib_sampler": "plms", "calib_steps": 50, "calib_eta": 0.0, "calib_scale": 3.0,
                  "calib_batch": 8, "calib_batches": 1},
        "naive": {"n_calib": 32, "train_steps": 50},
        "finetune": {"epochs": 8, "batch_size": 8, "eta": 0.0, "scale": 3.0, "preview_every": 4,
                     "checkpoint_every": 2},
    },
}

ARTIFACTS = {"calib": "calib.pt", "naive": "naive.pt", "finetuned": "finetuned.pt", "samples": "samples.npz"}
MADE_BY = {"calib": "quant_scripts/01_collect_input_4_calib.py", "naive": "quant_scripts/02_quantize_ldm_naive.py",
           "finetuned": "quant_scripts/03_train_mpqdm.py"}
REQUIRED = {"calib": ("x", "t"), "naive": ("state_dict",), "finetuned": ("state_dict",)}


def parser(description, constants, stage=None):
    """ArgumentParser with the shared model/run flags; the constants and preset overrides go in the epilog."""
    lines = "\n".join(f"  {k} = {v!r}" for k, v in constants.items())
    epilog = f"constants (paper ImageNet defaults; a preset may override, a flag always wins):\n{lines}"
    overrides = {name: d.get(stage) for name, d in PRESET_STAGE_DEFAULTS.items() if stage and d.get(stage)}
    if overrides:
        epilog += "\npreset overrides:\n" + "\n".join(f"  {name}: {o}" for name, o in overrides.items())
    p = cli.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=epilog)
    p.add_argument("--preset", default="cin256-v2", choices=PRESET_NAMES,
                   help="model preset: which config/checkpoint to load and the stage defaults to use "
                        "(default: cin256-v2, the paper's ImageNet setting)")
    p.add_argument("--run_dir", required=True,
                   help="directory holding this run's artifacts: calib.pt, naive.pt, finetuned.pt, samples.npz")
    p.add_argument("--device", type=cli.device, default=None,
                   help="torch device: cuda (the current GPU), cuda:N, cpu or mps (default: cuda when available, "
                        "else cpu)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest for the digits model on a busy "
                        "machine, where extra threads oversubscribe the cores)")
    # hidden: build the model from another config/checkpoint (tests, custom models) instead of the preset's
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--trust_config", action="store_true",
                   help="allow a --config whose targets lie outside the toolkit's packages and torch (a config's "
                        "target is imported and called: use only for configs you trust)")
    return p


def resolve(args, stage, constants):
    """Fill every None flag named in ``constants`` from the preset override, else the constant."""
    overrides = PRESET_STAGE_DEFAULTS[args.preset].get(stage, {})
    for name, value in constants.items():
        if getattr(args, name, None) is None:
            setattr(args, name, overrides.get(name, value))
    return args


# -------------------------------------------------------------------------------------- checks before any work
def family(args):
    """The model family of the preset ("ldm" or "pixel"); --config/--ckpt replace its files, not its family."""
    from ldm.presets import get_preset
    return get_preset(args.preset).family


def model_config(args):
    """The model config of --config or the preset, read without building anything: OmegaConf for an LDM, the ddim
    namespace for a pixel model."""
    from ldm.presets import get_preset

    if bool(args.config) != bool(args.ckpt):
        raise UserError("--config and --ckpt must be given together.")
    path = args.config or get_preset(args.preset).config_path
    if not os.path.isfile(path):
        raise UserError(f"The model config {path} does not exist.")
    if family(args) == "pixel":
        from ddim.config import load_config
        return load_config(path)  # safe YAML, refused with one sentence
    from omegaconf import OmegaConf
    try:
        config = OmegaConf.load(path)
        config.model.params  # noqa: B018  (a config without model.params is not an LDM config)
    except Exception as err:
        raise UserError(f"The model config {path} is not a readable LDM config ({type(err).__name__}).") from None
    check_config_targets(config.model, getattr(args, "trust_config", False))  # before anything is imported
    return config


def model_identity_config(args):
    """The part of the model config that identifies the model (hashed into every artifact)."""
    config = model_config(args)
    if family(args) == "pixel":
        from ddim.config import namespace2dict
        d = namespace2dict(config)
        return {k: d.get(k) for k in ("data", "model", "diffusion")}
    return config.get("model", config)


def num_timesteps(args):
    """Length T of the model's diffusion schedule, from its config."""
    config = model_config(args)
    if family(args) == "pixel":
        return int(config.diffusion.num_diffusion_timesteps)
    return int(config.model.params.get("timesteps", 1000))


def skip_type(args):
    """The timestep spacing of the preset: uniform (LDMs) or the pixel preset's (cifar10: quad)."""
    from ldm.presets import get_preset
    return get_preset(args.preset).skip_type


def schedule_for(args, steps, flag):
    """The sampling sequence of ``steps`` steps on the model's schedule (ascending; the pixel family's quad
    sequence keeps its repeated values), or a UserError naming ``flag``."""
    if family(args) == "pixel":
        from ddim.runners.diffusion import timestep_sequence
        total = num_timesteps(args)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
            raise UserError(f"{flag} {steps} does not fit the {total}-step schedule; choose 1 to {total} steps")
        return timestep_sequence(skip_type(args), steps, total)
    from ldm.generate import uniform_schedule
    return uniform_schedule(steps, num_timesteps(args), flag)


def check_model_files(args):
    """The preset's checkpoint (unless --ckpt replaces it) and SD's local CLIP tokenizer exist: one sentence saying
    how to get them otherwise, before any other input is read."""
    from ldm.presets import check_preset_files, clip_tokenizer_dir, get_preset

    if not args.ckpt:
        check_preset_files(args.preset)
    elif get_preset(args.preset).clip_tokenizer:
        clip_tokenizer_dir()


def distinct(timesteps):
    """The distinct values of a schedule, in order (the quantized model's step-table keys)."""
    from ldm.pipelines import distinct as _distinct
    return _distinct(timesteps)


def prepare_run_dir(args):
    """run_dir exists and is writable (one sentence otherwise); stale temporary files of a killed run removed."""
    ensure_writable_dir(args.run_dir, "run_dir")


def prepare_output(path, what="output"):
    """The directory of an output file outside run_dir is writable, and the path is not a directory."""
    if os.path.isdir(path):
        raise UserError(f"The {what} {path} is a directory; give a file path.")
    ensure_writable_dir(os.path.dirname(os.path.abspath(path)), f"directory of the {what}")


def device_of(args):
    from ldm.util import resolve_device
    return resolve_device(args.device)


def artifact_path(args, name):
    return os.path.join(args.run_dir, ARTIFACTS[name])


# ------------------------------------------------------------------------------------------------- loading
def load_fp_model(args, use_ema=None):
    """(FP model in eval mode, identity meta {preset, config_hash, model_fingerprint, use_ema}); the model is a
    LatentDiffusion or, for a pixel preset, a ddim PixelDiffusion. use_ema: override the preset's choice of EMA
    weights (the LSUN non-EMA teacher option)."""
    from ldm.generate import model_fingerprint
    from ldm.presets import check_preset_files, get_preset, load_model

    preset = get_preset(args.preset)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = device_of(args)
    use_ema = preset.use_ema if use_ema is None else bool(use_ema)
    ident_config = model_identity_config(args)
    if args.config or args.ckpt:
        model = load_model(preset.family, args.config, args.ckpt, device=device, use_ema=use_ema,
                           trust_config=getattr(args, "trust_config", False), clip_tokenizer=preset.clip_tokenizer)
    else:
        check_preset_files(args.preset)
        model = load_model(preset.family, preset.config_path, preset.ckpt_path, device=device, use_ema=use_ema,
                           download_name=preset.download, clip_tokenizer=preset.clip_tokenizer)
    model.requires_grad_(False)
    ident = {"preset": args.preset, "config_hash": config_hash(ident_config),
             "model_fingerprint": model_fingerprint(model), "use_ema": use_ema}
    return model, ident


def adapter(model):
    """The family adapter (ldm.pipelines) of a loaded model."""
    from ldm.pipelines import adapter_for
    return adapter_for(model)


def unet_config(args):
    """The network's {target, params} from the model config of --config or the preset (plain dict); for a pixel
    model {"target": "ddim.models.diffusion.Model", "params": {"config": <the identifying config sections>}}."""
    if family(args) == "pixel":
        return {"target": "ddim.models.diffusion.Model", "params": {"config": model_identity_config(args)}}
    from omegaconf import OmegaConf
    return OmegaConf.to_container(model_config(args).model.params.unet_config, resolve=True)


def unet_skeleton(args, header):
    """What quant.export.load_export rebuilds the network from: the UNet config (LDM), or for a pixel model a ddim
    Model built on the meta device after checking the export's config hash (its target takes a namespace)."""
    config = unet_config(args)
    if family(args) != "pixel":
        return config
    from ddim.config import dict2namespace
    from ddim.models.diffusion import Model
    from quant.export.packed import normalize_unet_config

    want = header.get("model_config_hash")
    have = config_hash(normalize_unet_config(config))
    if want is not None and want != have:
        raise UserError(f"The packed export was made for a model config with hash {want}, but --preset "
                        f"{args.preset} has {have}.")
    with torch.device("meta"):
        return Model(dict2namespace(config["params"]["config"]))


def class_info(model):
    """(class_conditional, n_classes, null_class) of the model."""
    from ldm.generate import conditioning_info
    return conditioning_info(model)


def load_stage_artifact(args, name, ident=None):
    """Load run_dir/<artifact>: readable, current format, right stage, intact (checksum), holding its payload,
    made from the upstream files now in run_dir (parent checksums), and, given ``ident``, from the same model."""
    path = artifact_path(args, name)
    what = f"{name} artifact"
    art = load_artifact(path, what=what, made_by=MADE_BY.get(name), stage=name, required=REQUIRED.get(name, ()))
    upstream = {stage: artifact_path(args, stage) for stage in MADE_BY}
    check_parents(art["meta"], upstream, what=f"{what} {path}", made_by=MADE_BY.get(name))
    if ident is not None:
        check_ident(art, ident, name, path)
    return art


def add_stage_flag(p, verb):
    """--stage of 04, 06 and 07 (default: finetuned.pt, or naive.pt when it holds a post-training model)."""
    p.add_argument("--stage", choices=["finetuned", "naive"], default=None,
                   help=f"which run_dir artifact to {verb} (default: finetuned.pt; for a post-training method such as "
                        "qdiffusion, whose model is complete after stage 2, naive.pt)")


def load_quantized_artifact(args, ident=None):
    """(stage, artifact) of the quantized model in run_dir that --stage names; without --stage, finetuned.pt, or
    naive.pt when run_dir has no finetuned.pt and naive.pt holds a post-training (complete) model."""
    stage = args.stage or "finetuned"
    if stage == "finetuned" and not os.path.exists(artifact_path(args, "finetuned")) \
            and os.path.exists(artifact_path(args, "naive")):
        naive = load_stage_artifact(args, "naive", ident)
        if naive["meta"].get("training") == "ptq":
            if args.stage is None:
                return "naive", naive
            raise UserError(f"{artifact_path(args, 'naive')} holds a post-training model, which has no fine-tuned "
                            "stage; use --stage naive or leave --stage out.")
    return stage, load_stage_artifact(args, stage, ident)


def check_ident(art, ident, name, path):
    """The artifact was made from the same model (preset, config hash, weights fingerprint, EMA choice)."""
    check_meta(art["meta"], ident, what=f"{name} artifact {path}",
               hint=f"re-run {MADE_BY.get(name, 'the stage that makes it')} with this model")


def check_bits(w_bits, a_bits):
    if w_bits not in SUPPORTED_W_BITS:
        raise UserError(f"Weight bits must be one of {list(SUPPORTED_W_BITS)}, got {w_bits}.")
    if a_bits not in SUPPORTED_A_BITS:
        raise UserError(f"Activation bits must be one of {list(SUPPORTED_A_BITS)}, got {a_bits}.")


def agree(args, meta, names, what):
    """Flags re-passed to a later stage must agree with what stage 02 chose (recorded in ``meta``)."""
    for flag, key in names.items():
        given = getattr(args, flag, None)
        if given is not None and given != meta.get(key):
            raise UserError(f"--{flag} {given} disagrees with the {what}, which was made with {key}={meta.get(key)!r}; "
                            "omit the flag or re-run quant_scripts/02_quantize_ldm_naive.py.")


def build_student(model, meta, state_dict, copy_unet=True, what="quantized artifact", made_by=None):
    """The model's FP UNet quantized with the artifact's structure and state. copy_unet=True keeps the FP UNet
    (the teacher) intact; False converts it in place (sampling only: saves one UNet of memory). A meta that does
    not describe a quantized structure, or a state dict that does not fit it, is a UserError."""
    import copy

    from quant.api import build_from_meta

    hint = f"re-run {made_by}" if made_by else "re-make it"
    unet = copy.deepcopy(model.model.diffusion_model) if copy_unet else model.model.diffusion_model
    try:
        qunet = build_from_meta(unet, meta)
    except UserError as err:
        raise UserError(f"The {what} describes no valid quantized model ({str(err).rstrip('.')}); {hint}.") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"The {what} describes no valid quantized model ({type(err).__name__}: {err}); "
                        f"{hint}.") from None
    load_state_dict_checked(qunet, state_dict, what, made_by)
    return qunet.to(model.device)
