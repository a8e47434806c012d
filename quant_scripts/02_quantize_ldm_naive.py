"""Stage 2: naive quantization -> run_dir/naive.pt (MPQ-DM.md §6-7), or post-training reconstruction (PEERS.md §1).

Wraps the FP UNet with the chosen method (efficientdm, mpqdm, mpqdm+) at W/A bits, then runs ONE sequential
no-grad forward on seeded random calibration tuples from calib.pt: each layer computes its smoothing factors,
its OMQ bit allocation (MPQ-DM) and its weight/activation scales when first reached. The method, bits and
options chosen here are recorded in the artifact and read by stages 3 and 4.

Every family: LDM tuples carry their context (class embeddings, or [77 x d] text contexts, uncond and cond rows as
recorded); the pixel family's have none. The per-step activation quantizers get one scale per DISTINCT timestep of
the --train_steps schedule (quant.step: the pixel family's quad-100 has 96, its repeated values share one).

Post-training methods (--method qdiffusion, tfmqdm, edadm) instead select calibration rows of calib.pt and run the
streamed block reconstruction (Q-Diffusion: cali_st steps x cali_n trajectories, AdaRound weights, then activation Δ;
TFMQ-DM: the same rows, TIAR on the time-embedding block, AdaRound on the rest, then per-step activation sets by FSC
on every recorded step, which must be the --train_steps schedule's: record calib.pt with 01 --calib_data
fresh_per_step on it; EDA-DM: TDAC picks how many of --tdac_n trajectories each step contributes, then FBR learns
rounding and activation Δ jointly per block with QDrop and layer losses); the result in naive.pt
is complete and goes straight to 04 (03 refuses it). The reconstruction resumes per block after a kill
(run_dir/recon/); its cache stays within --max_cache_gb in memory and spills to --cache_dir.
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
NAIVE_ONLY = ("n_calib", "calib_seed", "lora_rank", "conv_lora")  # the fine-tuned methods' naive stage

# ---- constants: Q-Diffusion's post-training defaults (PEERS.md §1; each is a flag; a preset may override them
#      through quant/methods/qdiffusion.py PRESETS, e.g. digits: 300 + 100 iterations per block) ----
PTQ_CONSTANTS = {
    "cali_st": 20,           # calibration steps {0, s, 2s, ...} of the recorded trajectories, s = steps // cali_st
    "cali_n": 256,           # trajectories per selected step (x2 rows with guidance: uncond and cond)
    "weight_iters": 20000,   # AdaRound iterations per block / layer
    "weight_lr": 1e-3,
    "weight_batch": 32,
    "weight_p": 2.0,         # reconstruction loss |y^ - y|^p of the weight stage
    "round_lambda": 0.01,    # AdaRound regulariser weight
    "round_warmup": 0.2,     # fraction of weight_iters without the regulariser (beta held at beta_start)
    "beta_start": 20.0,
    "beta_end": 2.0,
    "act_iters": 5000,       # activation-Δ (LSQ) iterations per block / layer
    "act_lr": 4e-4,          # cosine to 0
    "act_batch": 32,
    "act_p": 2.4,
    "act_scale_method": "mse",   # activation init: mse | max (min-max)
    "act_symmetric": "off",
    "running_stat": "off",   # EMA (running_momentum) of activation ranges over the calibration rows after the init
    "running_momentum": 0.95,
    "act_init_n": 64,        # rows of the activation-init forward (SD: 16)
    "running_batch": 64,     # rows per running-statistics forward (SD: 16)
    "split": "on",           # shortcut-split the decoder skip 1x1 convs
    "softmax_bits": 8,       # unsigned softmax quantizer of the attention (16: left out of Δ learning)
    "weight_init": "mse",    # per-channel weight scales: mse (LDM, SD) | max (CIFAR-10)
    "micro_batch": 8,        # rows per caching forward
    "max_cache_gb": 8.0,     # in-memory budget of one block's cached inputs and targets (the rest goes to disk)
    "cache_dir": "",         # "" = run_dir/recon/cache
    "cache_dtype": "float32",  # float16 halves the cache (cached inputs and targets rounded)
    # TFMQ-DM's own (PEERS.md §3; its preset sets act_init_n = running_batch = 16, FSC's init rows and EMA batches)
    "fsc": "paper",          # per-step activation sets: paper (TIB only) | released (every quantizer) | off (none)
    "fsc_n": 256,            # trajectories per step for FSC, on every recorded step
    "tiar": "on",            # reconstruct the time-embedding block on its own first (off: BRECQ-style, the ablation)
    "tiar_iters": 20000,     # AdaRound iterations of TIAR
    "tiar_batch": 32,
    # EDA-DM's own (PEERS.md §2; its presets set weight_iters, weight_lr (lr_w), act_lr (lr_a), running_batch and
    # running_momentum (the activation init's EMA batches, 0.9) and the range-search inits per task and precision)
    "tdac": "on",            # TDAC sample selection (off: the same number of samples from every step)
    "tdac_n": 1024,          # N calibration samples, one per recorded trajectory
    "tdac_lambda": 1.2,      # variety weight against density
    "tdac_radius": 3.0,      # density radius r (ImageNet, CIFAR-10 3.0; LSUN, SD 0.3)
    "add_loss": 0.8,         # FBR: weight of the layer losses (0: block loss only)
    "qdrop": 0.5,            # QDrop drop probability on activations and block inputs (0: off)
    "release": "2025",       # whose recipe the preset defaults follow: the 2025 scripts or the 2024 release
}
SWITCHES = ("act_symmetric", "running_stat", "split", "tiar", "tdac")  # on/off flags -> booleans of the config


PTQ_METHODS = ("qdiffusion", "tfmqdm", "edadm")
METHODS = ("efficientdm", "mpqdm", "mpqdm+") + PTQ_METHODS


def build_parser():
    p = parser(__doc__, {**CONSTANTS, **PTQ_CONSTANTS}, "naive")
    p.add_argument("--method", choices=METHODS,
                   help="quantization method: efficientdm, mpqdm, mpqdm+ (fine-tuned next by 03) or qdiffusion, "
                        "tfmqdm, edadm (post-training: reconstructed here, sampled directly by 04)")
    p.add_argument("--n_bits_w", type=W_BITS,
                   help="weight bits b, 2..8 (MPQ-DM mixes b-1, b, b+1 per channel, so 2..7 there)")
    p.add_argument("--n_bits_a", type=A_BITS, help="activation bits (2..8)")
    p.add_argument("--train_steps", type=cli.positive_int,
                   help="sampling steps S of the fine-tuning and sampling schedule; the temporal activation "
                        "quantizers get one scale per distinct timestep of it (ImageNet 20, LSUN 100, CIFAR-10 "
                        "quad-100: 96); post-training methods record it as the default sampling schedule")
    n = p.add_argument_group("naive stage of the fine-tuned methods (efficientdm, mpqdm, mpqdm+)")
    n.add_argument("--n_calib", type=cli.positive_int,
                   help="calibration tuples in the naive forward (ImageNet 32, LSUN 256)")
    n.add_argument("--calib_seed", type=SEED, help="seed of the calibration-tuple draw")
    n.add_argument("--lora_rank", type=cli.nonneg_int, help="LoRA rank r of every quantized layer (0: no LoRA)")
    n.add_argument("--conv_lora", choices=["per_position", "shared_b"],
                   help="conv LoRA factorisation (default: the method's own)")
    m = p.add_argument_group("MPQ-DM only (mpqdm, mpqdm+)")
    m.add_argument("--omq", choices=["on", "off"], help="MPQ-DM ablation: off = every channel at b bits")
    m.add_argument("--omq_candidates", choices=["paper", "released"],
                   help="OMQ split sizes: paper {0..50%% in Cout/10 steps} or released {0, 10%%}")
    m.add_argument("--trd_mode", choices=["paper", "released", "off"],
                   help="TRD: paper (gradient through the student feature), released (detached, logged only), off")
    m.add_argument("--trd_window", type=cli.positive_int,
                   help="TRD window N (consecutive steps averaged; 1 = no smoothing)")
    m.add_argument("--trd_lambda", type=cli.nonneg_float, help="TRD weight lambda")
    m.add_argument("--trd_tau", type=cli.positive_float, help="TRD softmax temperature tau")
    m.add_argument("--trd_cadence", choices=["aligned", "sliding"],
                   help="TRD windows: aligned (non-overlapping, every N-th step) or sliding (every step >= N-1)")
    q = p.add_argument_group("post-training reconstruction (qdiffusion, tfmqdm; PEERS.md §1, §3; the activation "
                             "stage's act_* options, running_stat, act_symmetric and split are Q-Diffusion's)")
    q.add_argument("--cali_st", type=cli.positive_int,
                   help="calibration steps: {0, s, 2s, ...} of calib.pt's trajectories, s = recorded steps // cali_st")
    q.add_argument("--cali_n", type=cli.positive_int,
                   help="recorded trajectories used at each selected step (x2 rows with guidance)")
    q.add_argument("--weight_iters", type=cli.nonneg_int, help="AdaRound iterations per block or lone layer")
    q.add_argument("--weight_lr", type=cli.positive_float, help="Adam lr of the rounding variables V")
    q.add_argument("--weight_batch", type=cli.positive_int, help="rows per AdaRound iteration")
    q.add_argument("--weight_p", type=cli.positive_float, help="exponent p of the weight stage's |y^ - y|^p loss")
    q.add_argument("--round_lambda", type=cli.nonneg_float, help="weight of the rounding regulariser f_reg")
    q.add_argument("--round_warmup", type=cli.float_in(0.0, 1.0),
                   help="fraction of weight_iters before f_reg starts (beta held at beta_start), in [0, 1)")
    q.add_argument("--beta_start", type=cli.positive_float, help="f_reg's beta after the warm-up (decays linearly)")
    q.add_argument("--beta_end", type=cli.positive_float, help="f_reg's beta at the last iteration")
    q.add_argument("--act_iters", type=cli.nonneg_int, help="activation-Δ (LSQ) iterations per block or lone layer")
    q.add_argument("--act_lr", type=cli.positive_float, help="Adam lr of the activation Δ (cosine to 0)")
    q.add_argument("--act_batch", type=cli.positive_int, help="rows per activation-stage iteration")
    q.add_argument("--act_p", type=cli.positive_float, help="exponent p of the activation stage's loss")
    q.add_argument("--act_scale_method", choices=["mse", "max", "search"],
                   help="activation init: mse search, min-max, or EDA-DM's range search")
    q.add_argument("--act_symmetric", choices=["on", "off"], help="signed activation grid [-2^(b-1), 2^(b-1)-1]")
    q.add_argument("--running_stat", choices=["on", "off"],
                   help="after the init, an EMA of activation ranges over all calibration rows (LSUN beds, SD)")
    q.add_argument("--running_momentum", type=cli.float_in(0.0, 1.0), help="EMA momentum, in (0, 1)")
    q.add_argument("--act_init_n", type=cli.positive_int, help="rows of the activation-init forward")
    q.add_argument("--running_batch", type=cli.positive_int, help="rows per running-statistics forward")
    q.add_argument("--split", choices=["on", "off"],
                   help="shortcut-split quantization of the decoder skip 1x1 convs (two quantizer pairs)")
    q.add_argument("--softmax_bits", type=cli.int_in(2, 16),
                   help="bits of the unsigned softmax quantizer (16: excluded from Δ learning)")
    q.add_argument("--weight_init", choices=["mse", "max", "search"],
                   help="per-channel weight scale init (Q-Diffusion: LDM mse, CIFAR max; EDA-DM: range search)")
    q.add_argument("--micro_batch", type=cli.positive_int, help="rows per caching forward of a block's inputs")
    q.add_argument("--max_cache_gb", type=cli.positive_float,
                   help="memory budget (GiB) of one block's cached inputs and targets; beyond it they go to disk")
    q.add_argument("--cache_dir", help="where cache shards beyond the budget go (default run_dir/recon/cache)")
    q.add_argument("--cache_dtype", choices=["float32", "float16"],
                   help="float16 halves cache memory and disk (cached inputs and targets rounded)")
    f = p.add_argument_group("TFMQ-DM only (tfmqdm; PEERS.md §3)")
    f.add_argument("--fsc", choices=["paper", "released", "off"],
                   help="finite set calibration: per-step activation sets on the time-embedding block's inputs "
                        "(paper), on every activation quantizer (released code), or one set everywhere (off)")
    f.add_argument("--fsc_n", type=cli.positive_int,
                   help="recorded trajectories used per step by FSC (x2 rows with guidance), on every step")
    f.add_argument("--tiar", choices=["on", "off"],
                   help="time-embedding-aware reconstruction of the Temporal Information Block before the blocks")
    f.add_argument("--tiar_iters", type=cli.nonneg_int, help="AdaRound iterations of TIAR")
    f.add_argument("--tiar_batch", type=cli.positive_int, help="rows per TIAR iteration")
    e = p.add_argument_group("EDA-DM only (edadm; PEERS.md §2): TDAC selection, FBR with QDrop; weight_iters, "
                             "weight_lr, weight_batch, act_lr and running_batch/running_momentum apply to it as lr_w, "
                             "lr_a and the activation init's EMA; record its trajectories with 01 on the sampling "
                             "schedule (cin256-v2: --calib_steps 20 --calib_eta 0 --calib_scale 3.0 --calib_batch 64 "
                             "--calib_batches 16)")
    e.add_argument("--tdac", choices=["on", "off"],
                   help="TDAC: samples per step from the density and variety of the middle-attention features "
                        "(off: the same number from every step)")
    e.add_argument("--tdac_n", type=cli.positive_int,
                   help="N calibration samples, one per recorded trajectory (x2 rows with guidance)")
    e.add_argument("--tdac_lambda", type=cli.nonneg_float, help="TDAC's weight of variety against density")
    e.add_argument("--tdac_radius", type=cli.positive_float,
                   help="TDAC's density radius r on the mean squared distance of the features")
    e.add_argument("--add_loss", type=cli.nonneg_float,
                   help="FBR: weight of the per-layer losses added to the block loss (0: block loss only)")
    e.add_argument("--qdrop", type=cli.float_in(0.0, 1.0),
                   help="QDrop: probability that an activation element (and a block input element) is taken from "
                        "the FP path during reconstruction, in [0, 1) (0: off)")
    e.add_argument("--release", choices=["2025", "2024"],
                   help="preset defaults of the 2025 scripts or of the 2024 release (bedrooms, ImageNet, SD differ "
                        "in tdac_lambda and add_loss)")
    q.add_argument("--restart", action="store_true",
                   help="discard the resume state of a killed reconstruction in run_dir (and its cache) and start "
                        "over; without it a killed run continues from its last finished block")
    return p


def is_ptq(method):
    return method in PTQ_METHODS


def ptq_fields(method):
    """The PTQ_CONSTANTS options that ``method``'s config has (the others do not apply to it)."""
    from quant.api import get_method

    config_class = get_method(method)[0]
    return (set(PTQ_CONSTANTS) & set(config_class.__dataclass_fields__)) - set(config_class.unused)


def resolve_ptq(args, given):
    """Post-training options: explicit flag > the method's preset (quant/methods/<method>.py) > PTQ_CONSTANTS."""
    from quant.api import get_method

    preset = get_method(args.method)[1].preset_options(args.preset, w_bits=args.n_bits_w, a_bits=args.n_bits_a,
                                                        release=args.release or PTQ_CONSTANTS["release"])
    opts = {}
    for name in sorted(ptq_fields(args.method)):
        value = getattr(args, name) if name in given else preset.get(name, PTQ_CONSTANTS[name])
        opts[name] = (value == "on") if name in SWITCHES and isinstance(value, str) else value
        setattr(args, name, opts[name])
    return opts


def method_options(args, given=()):
    """Plain options for quant.api.make_config from the resolved flags."""
    opts = {"w_bits": args.n_bits_w, "a_bits": args.n_bits_a}
    if is_ptq(args.method):
        return {**opts, **resolve_ptq(args, given)}
    opts["lora_rank"] = args.lora_rank
    if args.conv_lora is not None:
        opts["conv_lora"] = args.conv_lora
    if args.method in ("mpqdm", "mpqdm+"):
        opts.update(omq=args.omq == "on", omq_candidates=args.omq_candidates, trd_mode=args.trd_mode,
                    trd_window=args.trd_window, trd_lambda=args.trd_lambda, trd_tau=args.trd_tau,
                    trd_cadence=args.trd_cadence)
    return opts


def check_args(args, given):
    """Cross-flag rules, from the flags and the model config alone (before any model is loaded); ``given``: the
    flags set on the command line. Returns the method's validated config and the schedule."""
    from quant.api import make_config

    first = lambda names: sorted(set(names) & given)[0] if set(names) & given else None  # noqa: E731
    if args.method not in ("mpqdm", "mpqdm+") and first(MPQDM_ONLY):
        raise UserError(f"--{first(MPQDM_ONLY)} is an MPQ-DM option; {args.method} has no OMQ or TRD.")
    if is_ptq(args.method) and first(NAIVE_ONLY):
        raise UserError(f"--{first(NAIVE_ONLY)} belongs to the fine-tuned methods' naive stage; {args.method} is "
                        "post-training (no LoRA) and selects its calibration rows with --cali_st and --cali_n.")
    if not is_ptq(args.method) and args.restart:
        raise UserError(f"--restart discards a post-training reconstruction's state; {args.method}'s naive stage has "
                        "none.")
    if not is_ptq(args.method) and first(PTQ_CONSTANTS):
        raise UserError(f"--{first(PTQ_CONSTANTS)} is a post-training reconstruction option; use it with "
                        f"--method {' or '.join(PTQ_METHODS)}, not {args.method}.")
    if is_ptq(args.method) and first(set(PTQ_CONSTANTS) - ptq_fields(args.method)):
        name = first(set(PTQ_CONSTANTS) - ptq_fields(args.method))
        owners = [m for m in PTQ_METHODS if name in ptq_fields(m)]
        raise UserError(f"--{name} is an option of {' and '.join(owners)}, not of {args.method}.")
    check_bits(args.n_bits_w, args.n_bits_a)
    config = make_config(args.method, **method_options(args, given))  # validates (UserError on a bad combination)
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
    given = {k for k in (*CONSTANTS, *PTQ_CONSTANTS) if getattr(args, k, None) is not None}  # before resolve()
    args = resolve(args, "naive", CONSTANTS)
    config, timesteps = check_args(args, given)
    prepare_run_dir(args)
    calib = load_stage_artifact(args, "calib")
    model, ident = load_fp_model(args)
    check_ident(calib, ident, "calib", artifact_path(args, "calib"))
    if is_ptq(args.method):
        check_calib(calib, 1, model)
        qunet, meta = reconstruct(args, config, calib, model, timesteps)
    else:
        check_calib(calib, args.n_calib, model)
        qunet, meta = naive_calibration(args, config, calib, model, timesteps)
    meta = {**ident, **qunet.meta(), "stage": "naive", "n_bits_w": args.n_bits_w, "n_bits_a": args.n_bits_a,
            "train_steps": args.train_steps, "calib_timesteps": calib["meta"].get("calib_timesteps"),
            "calib_seed_collect": calib["meta"].get("seed"), **meta}
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
    if is_ptq(args.method):  # the resume state has served its purpose: naive.pt holds the result
        from quant.reconstruct import discard_state
        discard_state(args.run_dir, args.cache_dir)
    n_layers = len(qunet.quant_layers())
    if is_ptq(args.method):
        print(f"wrote {path}: {args.method} W{args.n_bits_w}A{args.n_bits_a}, {n_layers} quantized layers, "
              f"reconstructed on {meta['n_calib_rows']} calibration rows in {meta['ptq_seconds']:.0f} s; sample it "
              "with quant_scripts/04_sample_lora_model.py (no fine-tuning step)")
    else:
        print(f"wrote {path}: {args.method} W{args.n_bits_w}A{args.n_bits_a}, {n_layers} quantized layers, "
              f"calibrated on {args.n_calib} tuples")
    return path


def naive_calibration(args, config, calib, model, timesteps):
    """The fine-tuned methods' naive stage: one calibration forward on n_calib random tuples."""
    from quant.api import quantize_
    from quant.stages.calibrate import calibrate

    n_avail = int(calib["t"].shape[0])
    idx = torch.randperm(n_avail, generator=torch.Generator().manual_seed(args.calib_seed))[:args.n_calib]
    device = model.device
    x, t = calib["x"][idx].to(device), calib["t"][idx].to(device)
    context = calib["context"][idx].to(device) if "context" in calib else None
    qunet = quantize_(model.model.diffusion_model, config, timesteps)
    layer_log = calibrate(qunet, x, t, context)
    omq_choice = {name: {k: v for k, v in log.items() if k in ("m", "cout", "m_frac", "bits", "avg_bits")}
                  for name, log in layer_log.items() if log.get("role") == "quant"}
    return qunet, {"n_calib": args.n_calib, "calib_seed": args.calib_seed,
                   "trd_mode": getattr(config, "trd_mode", "off"), "omq_choice": omq_choice}


def reconstruct(args, config, calib, model, timesteps):
    """A post-training method: select the calibration rows and reconstruct block by block (resumable)."""
    import time

    from quant.reconstruct import discard_state, run_ptq

    if args.restart:
        discard_state(args.run_dir, args.cache_dir)
    start = time.perf_counter()
    qunet = run_ptq(model.model.diffusion_model, config, calib, args.run_dir, timesteps, progress=not args.no_progress)
    log = qunet.ptq_log
    extra = {"calib_selection": log["selection"]} if "selection" in log else {}   # EDA-DM: TDAC's weights, counts
    return qunet, {"n_calib_rows": int(log.get("rows", 0)), "ptq_seconds": time.perf_counter() - start,
                   "ptq_times": log.get("times", {}), "trd_mode": "off",
                   "calib_data": calib["meta"].get("calib_data", "trajectory"), **extra}


if __name__ == "__main__":
    cli_main(main)
