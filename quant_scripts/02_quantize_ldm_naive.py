"""Stage 2: naive quantization -> run_dir/naive.pt (MPQ-DM.md §6-7).

Wraps the FP UNet with the chosen method (efficientdm, mpqdm, mpqdm+) at W/A bits, then runs ONE sequential
no-grad forward on seeded random calibration tuples from calib.pt: each layer computes its smoothing factors,
its OMQ bit allocation (MPQ-DM) and its weight/activation scales when first reached. The method, bits and
options chosen here are recorded in the artifact and read by stages 3 and 4.

Every family: LDM tuples carry their context (class embeddings, or [77 x d] text contexts, uncond and cond rows as
recorded); the pixel family's have none. The per-step activation quantizers get one scale per DISTINCT timestep of
the --train_steps schedule (quant.step: the pixel family's quad-100 has 96, its repeated values share one).
"""
import torch

# _common first: it puts the repository root on sys.path
from _common import (A_BITS, SEED, W_BITS, adapter, artifact_path, check_bits, check_ident, family, load_fp_model,
                     load_stage_artifact, parser, prepare_run_dir, resolve, schedule_for, skip_type)
from ldm import cli
from ldm.util import UserError, cli_main
from quant.artifacts import save_artifact

# ---- constants: MPQ-DM ImageNet defaults (each is also a flag; a --preset may override) ----
CONSTANTS = {
    "method": "mpqdm",
    "n_bits_w": 2,
    "n_bits_a": 4,
    "n_calib": 32,           # random calibration tuples for the one naive forward (LSUN: 256)
    "calib_seed": 0,         # the draw of those tuples
    "train_steps": 20,       # DDIM steps of the fine-tuning/sampling schedule (sizes the temporal quantizers)
    "lora_rank": 32,
    "omq": "on",
    "omq_candidates": "paper",
    "conv_lora": None,       # None: the method's default (mpqdm: per_position, efficientdm: shared_b)
    "trd_mode": "paper",
    "trd_window": 2,
    "trd_lambda": 100.0,
    "trd_tau": 1.0,
    "trd_cadence": "aligned",
}
MPQDM_ONLY = ("omq", "omq_candidates", "trd_mode", "trd_window", "trd_lambda", "trd_tau", "trd_cadence")


def build_parser():
    p = parser(__doc__, CONSTANTS, "naive")
    p.add_argument("--method", choices=["efficientdm", "mpqdm", "mpqdm+"], help="quantization method")
    p.add_argument("--n_bits_w", type=W_BITS,
                   help="weight bits b, 2..8 (MPQ-DM mixes b-1, b, b+1 per channel, so 2..7 there)")
    p.add_argument("--n_bits_a", type=A_BITS, help="activation bits (2..8)")
    p.add_argument("--n_calib", type=cli.positive_int,
                   help="calibration tuples in the naive forward (ImageNet 32, LSUN 256)")
    p.add_argument("--calib_seed", type=SEED, help="seed of the calibration-tuple draw")
    p.add_argument("--train_steps", type=cli.positive_int,
                   help="sampling steps S of the fine-tuning and sampling schedule; the temporal activation "
                        "quantizers get one scale per distinct timestep of it (ImageNet 20, LSUN 100, CIFAR-10 "
                        "quad-100: 96)")
    p.add_argument("--lora_rank", type=cli.nonneg_int, help="LoRA rank r of every quantized layer (0: no LoRA)")
    p.add_argument("--omq", choices=["on", "off"], help="MPQ-DM ablation: off = every channel at b bits")
    p.add_argument("--omq_candidates", choices=["paper", "released"],
                   help="OMQ split sizes: paper {0..50%% in Cout/10 steps} or released {0, 10%%}")
    p.add_argument("--conv_lora", choices=["per_position", "shared_b"],
                   help="conv LoRA factorisation (default: the method's own)")
    p.add_argument("--trd_mode", choices=["paper", "released", "off"],
                   help="TRD: paper (gradient through the student feature), released (detached, logged only), off")
    p.add_argument("--trd_window", type=cli.positive_int,
                   help="TRD window N (consecutive steps averaged; 1 = no smoothing)")
    p.add_argument("--trd_lambda", type=cli.nonneg_float, help="TRD weight lambda")
    p.add_argument("--trd_tau", type=cli.positive_float, help="TRD softmax temperature tau")
    p.add_argument("--trd_cadence", choices=["aligned", "sliding"],
                   help="TRD windows: aligned (non-overlapping, every N-th step) or sliding (every step >= N-1)")
    return p


def method_options(args):
    """Plain options for quant.api.make_config from the resolved flags."""
    opts = {"w_bits": args.n_bits_w, "a_bits": args.n_bits_a, "lora_rank": args.lora_rank}
    if args.conv_lora is not None:
        opts["conv_lora"] = args.conv_lora
    if args.method in ("mpqdm", "mpqdm+"):
        opts.update(omq=args.omq == "on", omq_candidates=args.omq_candidates, trd_mode=args.trd_mode,
                    trd_window=args.trd_window, trd_lambda=args.trd_lambda, trd_tau=args.trd_tau,
                    trd_cadence=args.trd_cadence)
    return opts


def check_args(args, given):
    """Cross-flag rules, from the flags and the model config alone (before any model is loaded); ``given``: the
    MPQ-DM-only flags set on the command line. Returns the method's validated config and the schedule."""
    from quant.api import make_config

    if args.method == "efficientdm" and given:
        raise UserError(f"--{sorted(given)[0]} is an MPQ-DM option; EfficientDM has no OMQ or TRD.")
    check_bits(args.n_bits_w, args.n_bits_a)
    config = make_config(args.method, **method_options(args))  # validates (UserError on a bad combination)
    return config, schedule_for(args, args.train_steps, "--train_steps")


def check_calib(calib, n_calib, model):
    """calib.pt holds enough tuples of the shapes this model's UNet takes."""
    x, t, context = calib["x"], calib["t"], calib.get("context")
    shape = tuple(adapter(model).latent_shape)
    fits = (torch.is_tensor(x) and torch.is_tensor(t) and x.dim() == 4 and tuple(x.shape[1:]) == shape
            and t.dim() == 1 and t.shape[0] == x.shape[0] and not t.is_floating_point()
            and (context is None or (torch.is_tensor(context) and context.shape[0] == x.shape[0])))
    if not fits:
        raise UserError(f"calib.pt does not hold UNet inputs x [N,{','.join(map(str, shape))}] with timesteps t [N] "
                        "for this model; re-run quant_scripts/01_collect_input_4_calib.py.")
    if not (torch.isfinite(x).all() and (context is None or torch.isfinite(context).all())):
        raise UserError("calib.pt holds non-finite values (NaN or inf); re-run "
                        "quant_scripts/01_collect_input_4_calib.py with finite settings.")
    if n_calib > int(t.shape[0]):
        raise UserError(f"--n_calib {n_calib} exceeds the {int(t.shape[0])} tuples in calib.pt; record more with "
                        "quant_scripts/01_collect_input_4_calib.py or lower --n_calib.")


def main(argv=None):
    args = build_parser().parse_args(argv)
    given = {k for k in MPQDM_ONLY if getattr(args, k) is not None}  # before resolve() fills the defaults
    args = resolve(args, "naive", CONSTANTS)
    config, timesteps = check_args(args, given)
    prepare_run_dir(args)
    calib = load_stage_artifact(args, "calib")

    from quant.api import quantize_
    from quant.stages.calibrate import calibrate

    model, ident = load_fp_model(args)
    check_ident(calib, ident, "calib", artifact_path(args, "calib"))
    check_calib(calib, args.n_calib, model)
    n_avail = int(calib["t"].shape[0])
    idx = torch.randperm(n_avail, generator=torch.Generator().manual_seed(args.calib_seed))[:args.n_calib]
    device = model.device
    x, t = calib["x"][idx].to(device), calib["t"][idx].to(device)
    context = calib["context"][idx].to(device) if "context" in calib else None

    qunet = quantize_(model.model.diffusion_model, config, timesteps)
    layer_log = calibrate(qunet, x, t, context)

    omq_choice = {name: {k: v for k, v in log.items() if k in ("m", "cout", "m_frac", "bits", "avg_bits")}
                  for name, log in layer_log.items() if log.get("role") == "quant"}
    meta = {**ident, **qunet.meta(), "stage": "naive", "n_bits_w": args.n_bits_w, "n_bits_a": args.n_bits_a,
            "train_steps": args.train_steps, "n_calib": args.n_calib, "calib_seed": args.calib_seed,
            "calib_timesteps": calib["meta"].get("calib_timesteps"), "calib_seed_collect": calib["meta"].get("seed"),
            "trd_mode": getattr(config, "trd_mode", "off"), "omq_choice": omq_choice}
    if family(args) == "pixel":  # the schedule as sampled (with its repeats) next to the distinct table keys
        meta.update(skip_type=skip_type(args), sampling_timesteps=list(timesteps))
    if calib["meta"].get("calib_prompts") is not None:  # 04 keeps evaluation prompts out of them
        meta["calib_prompts"] = calib["meta"]["calib_prompts"]
    bad = [k for k, v in qunet.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"Calibration produced {len(bad)} non-finite tensors ({bad[0]} first), so nothing was "
                        "written; check the model's weights and calib.pt.")
    path = artifact_path(args, "naive")
    save_artifact(path, meta, parent={"calib": calib["meta"]["checksum"]}, state_dict=qunet.state_dict())
    n_layers = len(qunet.quant_layers())
    print(f"wrote {path}: {args.method} W{args.n_bits_w}A{args.n_bits_a}, {n_layers} quantized layers, "
          f"calibrated on {args.n_calib} tuples")
    return path


if __name__ == "__main__":
    cli_main(main)
