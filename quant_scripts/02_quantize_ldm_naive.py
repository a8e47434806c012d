"""Stage 2: naive quantization -> run_dir/naive.pt (MPQ-DM.md §6-7).

Wraps the FP UNet with the chosen method (efficientdm, mpqdm, mpqdm+) at W/A bits, then runs ONE sequential
no-grad forward on seeded random calibration tuples from calib.pt: each layer computes its smoothing factors,
its OMQ bit allocation (MPQ-DM) and its weight/activation scales when first reached. The method, bits and
options chosen here are recorded in the artifact and read by stages 3 and 4.
"""
import torch

# _common first: it puts the repository root on sys.path
from _common import (artifact_path, check_bits, load_fp_model, load_stage_artifact, parser, resolve)
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
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
    p.add_argument("--n_bits_w", type=int, help="weight bits b (MPQ-DM mixes b-1, b, b+1 per channel)")
    p.add_argument("--n_bits_a", type=int, help="activation bits (2..8)")
    p.add_argument("--n_calib", type=int, help="calibration tuples in the naive forward (ImageNet 32, LSUN 256)")
    p.add_argument("--calib_seed", type=int, help="seed of the calibration-tuple draw")
    p.add_argument("--train_steps", type=int,
                   help="DDIM steps S of the fine-tuning and sampling schedule; the temporal activation "
                        "quantizers get one scale per step (ImageNet 20, LSUN 100)")
    p.add_argument("--lora_rank", type=int, help="LoRA rank r of every quantized layer")
    p.add_argument("--omq", choices=["on", "off"], help="MPQ-DM ablation: off = every channel at b bits")
    p.add_argument("--omq_candidates", choices=["paper", "released"],
                   help="OMQ split sizes: paper {0..50%% in Cout/10 steps} or released {0, 10%%}")
    p.add_argument("--conv_lora", choices=["per_position", "shared_b"],
                   help="conv LoRA factorisation (default: the method's own)")
    p.add_argument("--trd_mode", choices=["paper", "released", "off"],
                   help="TRD: paper (gradient through the student feature), released (detached, logged only), off")
    p.add_argument("--trd_window", type=int, help="TRD window N (consecutive steps averaged; 1 = no smoothing)")
    p.add_argument("--trd_lambda", type=float, help="TRD weight lambda")
    p.add_argument("--trd_tau", type=float, help="TRD softmax temperature tau")
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


def main(argv=None):
    raw = build_parser().parse_args(argv)
    given = {k for k in MPQDM_ONLY if getattr(raw, k) is not None}
    args = resolve(raw, "naive", CONSTANTS)
    if args.method == "efficientdm" and given:
        raise UserError(f"--{sorted(given)[0]} is an MPQ-DM option; EfficientDM has no OMQ or TRD.")
    check_bits(args.n_bits_w, args.n_bits_a)
    if args.n_calib < 1 or args.train_steps < 1:
        raise UserError("--n_calib and --train_steps must be positive.")

    from quant.api import make_config, quantize_
    from quant.stages.calibrate import calibrate

    config = make_config(args.method, **method_options(args))  # validates (UserError on a bad combination)
    model, ident = load_fp_model(args)
    calib = load_stage_artifact(args, "calib", ident)
    n_avail = int(calib["t"].shape[0])
    if args.n_calib > n_avail:
        raise UserError(f"--n_calib {args.n_calib} exceeds the {n_avail} tuples in calib.pt; record more with "
                        "quant_scripts/01_collect_input_4_calib.py or lower --n_calib.")
    idx = torch.randperm(n_avail, generator=torch.Generator().manual_seed(args.calib_seed))[:args.n_calib]
    device = model.device
    x, t = calib["x"][idx].to(device), calib["t"][idx].to(device)
    context = calib["context"][idx].to(device) if "context" in calib else None

    timesteps = [int(v) for v in make_ddim_timesteps("uniform", args.train_steps, model.num_timesteps, verbose=False)]
    qunet = quantize_(model.model.diffusion_model, config, timesteps)
    layer_log = calibrate(qunet, x, t, context)

    omq_choice = {name: {k: v for k, v in log.items() if k in ("m", "cout", "m_frac", "bits", "avg_bits")}
                  for name, log in layer_log.items() if log.get("role") == "quant"}
    meta = {**ident, **qunet.meta(), "stage": "naive", "n_bits_w": args.n_bits_w, "n_bits_a": args.n_bits_a,
            "train_steps": args.train_steps, "n_calib": args.n_calib, "calib_seed": args.calib_seed,
            "calib_timesteps": calib["meta"].get("calib_timesteps"), "calib_seed_collect": calib["meta"].get("seed"),
            "trd_mode": getattr(config, "trd_mode", "off"), "omq_choice": omq_choice}
    path = artifact_path(args, "naive")
    save_artifact(path, meta, state_dict=qunet.state_dict())
    n_layers = len(qunet.quant_layers())
    print(f"wrote {path}: {args.method} W{args.n_bits_w}A{args.n_bits_a}, {n_layers} quantized layers, "
          f"calibrated on {args.n_calib} tuples")
    return path


if __name__ == "__main__":
    cli_main(main)
