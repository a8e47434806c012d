"""Helpers shared by the numbered quant_scripts: presets, flag resolution, model loading, artifact checks.

Flag precedence: an explicit flag > the preset's override (PRESET_STAGE_DEFAULTS) > the script's constants block
(the paper's ImageNet defaults). Flags therefore default to None in argparse and are resolved here.
"""
import argparse
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # scripts run as `python quant_scripts/0X_....py` from anywhere
    sys.path.insert(0, REPO_ROOT)

from ldm.util import UserError  # noqa: E402
from quant.artifacts import check_meta, config_hash, load_artifact  # noqa: E402

PRESET_NAMES = ("cin256-v2", "lsun_beds256", "lsun_churches256", "digits")
SUPPORTED_W_BITS = (2, 3, 4, 5, 6, 7, 8)  # OMQ's b+1 group must fit 8 bits: MPQ-DM allows 2..7, EfficientDM 2..8
SUPPORTED_A_BITS = (2, 3, 4, 5, 6, 7, 8)

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
        # ~0.2-1 s per iteration (B=8, W2A4, CPU): 16 epochs x 20 steps = 320 iterations, 1-5 minutes
        "finetune": {"epochs": 16, "batch_size": 8, "eta": 0.0, "scale": 3.0, "preview_every": 8,
                     "preview_classes": [3, 8], "checkpoint_every": 4},
    },
}

ARTIFACTS = {"calib": "calib.pt", "naive": "naive.pt", "finetuned": "finetuned.pt", "samples": "samples.npz"}
MADE_BY = {"calib": "quant_scripts/01_collect_input_4_calib.py", "naive": "quant_scripts/02_quantize_ldm_naive.py",
           "finetuned": "quant_scripts/03_train_mpqdm.py"}


def parser(description, constants, stage=None):
    """ArgumentParser with the shared model/run flags; the constants and preset overrides go in the epilog."""
    lines = "\n".join(f"  {k} = {v!r}" for k, v in constants.items())
    epilog = f"constants (paper ImageNet defaults; a preset may override, a flag always wins):\n{lines}"
    overrides = {name: d.get(stage) for name, d in PRESET_STAGE_DEFAULTS.items() if stage and d.get(stage)}
    if overrides:
        epilog += "\npreset overrides:\n" + "\n".join(f"  {name}: {o}" for name, o in overrides.items())
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog)
    p.add_argument("--preset", default="cin256-v2", choices=PRESET_NAMES,
                   help="model preset: which config/checkpoint to load and the stage defaults to use "
                        "(default: cin256-v2, the paper's ImageNet setting)")
    p.add_argument("--run_dir", required=True,
                   help="directory holding this run's artifacts: calib.pt, naive.pt, finetuned.pt, samples.npz")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest for the digits model on a busy "
                        "machine, where extra threads oversubscribe the cores)")
    # hidden: build the model from another config/checkpoint (tests, custom models) instead of the preset's
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    return p


def resolve(args, stage, constants):
    """Fill every None flag named in ``constants`` from the preset override, else the constant."""
    overrides = PRESET_STAGE_DEFAULTS[args.preset].get(stage, {})
    for name, value in constants.items():
        if getattr(args, name, None) is None:
            setattr(args, name, overrides.get(name, value))
    return args


def device_of(args):
    from ldm.util import default_device
    return default_device(args.device)


def artifact_path(args, name):
    return os.path.join(args.run_dir, ARTIFACTS[name])


def load_fp_model(args, use_ema=None):
    """(FP LatentDiffusion in eval mode, identity meta {preset, config_hash, model_fingerprint, use_ema}).
    use_ema: override the preset's choice of EMA weights (the LSUN non-EMA teacher option)."""
    from omegaconf import OmegaConf

    from ldm.generate import model_fingerprint
    from ldm.presets import get_preset, load_preset_model
    from ldm.util import load_model_from_config

    preset = get_preset(args.preset)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = device_of(args)
    use_ema = preset.use_ema if use_ema is None else bool(use_ema)
    if args.config or args.ckpt or use_ema != preset.use_ema:
        if bool(args.config) != bool(args.ckpt):
            raise UserError("--config and --ckpt must be given together.")
        config_path, ckpt = (args.config, args.ckpt) if args.config else (preset.config_path, preset.ckpt_path)
        if not os.path.isfile(config_path):
            raise UserError(f"The model config {config_path} does not exist.")
        config = OmegaConf.load(config_path)
        model = load_model_from_config(config, ckpt, use_ema_weights=use_ema, device=device,
                                       download_name=None if args.config else preset.download)
    else:
        model = load_preset_model(args.preset, device=device)
        config = OmegaConf.load(preset.config_path)
    model.requires_grad_(False)
    ident = {"preset": args.preset, "config_hash": config_hash(config.get("model", config)),
             "model_fingerprint": model_fingerprint(model), "use_ema": use_ema}
    return model, ident


def unet_config(args):
    """The UNet's {target, params} from the model config of --config or the preset (plain dict)."""
    from omegaconf import OmegaConf

    from ldm.presets import get_preset

    config = OmegaConf.load(args.config or get_preset(args.preset).config_path)
    return OmegaConf.to_container(config.model.params.unet_config, resolve=True)


def class_info(model):
    """(class_conditional, n_classes, null_class) of the LDM."""
    from ldm.generate import conditioning_info
    return conditioning_info(model)


def load_stage_artifact(args, name, ident):
    """Load run_dir/<artifact> and check that it was made from the same model (preset, config, weights)."""
    path = artifact_path(args, name)
    art = load_artifact(path, what=f"{name} artifact", made_by=MADE_BY.get(name))
    check_meta(art["meta"], ident, what=f"{name} artifact {path}")
    return art


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


def build_student(model, naive_meta, state_dict, copy_unet=True):
    """The model's FP UNet quantized with the artifact's structure and state. copy_unet=True keeps the FP UNet
    (the teacher) intact; False converts it in place (sampling only: saves one UNet of memory)."""
    import copy

    from quant.api import build_from_meta

    unet = copy.deepcopy(model.model.diffusion_model) if copy_unet else model.model.diffusion_model
    qunet = build_from_meta(unet, naive_meta)
    qunet.load_state_dict(state_dict)
    return qunet.to(model.device)
