"""Peak memory, wall and CPU time of Q-Diffusion's streamed reconstruction (CPU).

Two uses:
- Full-size smoke run (default): the UNet of ``--config`` (default cin256-v2, the ImageNet LDM-4 with 400M UNet
  parameters) with random weights, a synthetic calibration set (N(0, 1) latents at the model's real latent size,
  random timesteps and class-context vectors; ``--steps`` steps x ``--samples`` samples x {uncond, cond}) and
  ``--iters`` iterations per unit at batch ``--batch``. Every stage runs end to end at full size (weight init,
  AdaRound weight stage with its caching forwards, activation init, activation-Δ stage); only the counts are small.
- A real preset run: ``--ckpt`` (the LDM checkpoint), ``--calib`` (a calib.pt from quant_scripts/01) and
  ``--preset`` (Q-Diffusion's defaults for it, e.g. digits); explicit flags still override.
The activation init is one forward over ``act_init_n`` rows at once (64 in the LDM recipe), which a smoke run's few
rows do not exercise; ``--act_init_rows N`` measures that forward alone instead (weights `max`, no reconstruction).
Reports peak RSS (resource.getrusage ru_maxrss), wall and CPU seconds, per-stage wall times, units, largest cache.

    .venv/bin/python benchmarks/ptq_memory.py --threads 1 --run_dir /tmp/ptq_memory
    .venv/bin/python benchmarks/ptq_memory.py --threads 1 --run_dir /tmp/ptq_memory --act_init_rows 64
    .venv/bin/python benchmarks/ptq_memory.py --threads 1 --run_dir /tmp/ptq_digits --preset digits \
        --config configs/latent-diffusion/digits-ldm-vq-4.yaml --ckpt models/ldm/digits-ldm-vq-4/model.ckpt \
        --calib runs/digits/calib.pt
"""
import json
import os
import resource
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from ldm.cli import ArgumentParser, int_in, positive_float, positive_int  # noqa: E402
from ldm.util import UserError, cli_main, instantiate_from_config  # noqa: E402

GiB = 1024 ** 3
SMOKE = {"steps": 2, "samples": 2, "iters": 2, "batch": 4}     # defaults of the full-size smoke run
TIMESTEPS = 20                                                  # DDIM steps of the recorded schedule


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml", help="model config (UNet part used)")
    p.add_argument("--run_dir", required=True, help="directory for the resumable state and the cache (emptied first)")
    p.add_argument("--ckpt", default=None, help="LDM checkpoint for real UNet weights (default: random weights)")
    p.add_argument("--calib", default=None, help="calib.pt from quant_scripts/01 (default: synthetic data)")
    p.add_argument("--preset", default=None, choices=["cin256-v2", "lsun_beds256", "lsun_churches256", "digits"],
                   help="Q-Diffusion preset whose defaults to use (default: cin256-v2 with the smoke-run counts)")
    p.add_argument("--w_bits", type=int_in(1, 8), default=4, help="weight bits (default 4)")
    p.add_argument("--a_bits", type=int_in(2, 8), default=8, help="activation bits (default 8)")
    p.add_argument("--steps", type=positive_int, default=None, help="calibration steps cali_st (smoke default 2)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="samples per step cali_n, each an uncond and a cond row (smoke default 2: 8 rows)")
    p.add_argument("--iters", type=positive_int, default=None, help="iterations per unit, both stages (smoke: 2)")
    p.add_argument("--batch", type=positive_int, default=None, help="reconstruction batch size (smoke default 4)")
    p.add_argument("--max_cache_gb", type=positive_float, default=8.0, help="cache budget in GiB (default 8)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=positive_int, default=1, help="seed of random weights and synthetic data (default 1)")
    p.add_argument("--act_init_rows", type=positive_int, default=None,
                   help="measure only the activation-init forward over this many rows (the recipe's 64)")
    return p


def synthetic_calib(params, steps, samples, seed):
    """A calib.pt-shaped artifact: one run of ``steps`` steps, [uncond; cond] rows of ``samples`` trajectories."""
    g = torch.Generator().manual_seed(seed)
    rows = steps * 2 * samples
    size, channels = int(params["image_size"]), int(params["in_channels"])
    calib = {"meta": {"n_entries": steps, "rows_per_entry": 2 * samples, "calib_steps": steps,
                      "calib_batch": samples, "calib_batches": 1},
             "x": torch.randn(rows, channels, size, size, generator=g),
             "t": torch.randint(0, 1000, (steps,), generator=g).repeat_interleave(2 * samples)}
    if params.get("context_dim"):
        calib["context"] = torch.randn(rows, 1, int(params["context_dim"]), generator=g)
    return calib


def options_for(args):
    from quant.methods.qdiffusion import preset_options

    smoke = args.preset is None
    options = preset_options(args.preset or "cin256-v2")
    given = {k: getattr(args, k) if getattr(args, k) is not None else (SMOKE[k] if smoke else None) for k in SMOKE}
    for key, names in {"steps": ["cali_st"], "samples": ["cali_n"], "iters": ["weight_iters", "act_iters"],
                       "batch": ["weight_batch", "act_batch", "running_batch"]}.items():
        if given[key] is not None:
            options.update({n: given[key] for n in names})
    if smoke:
        options["act_init_n"] = 2 * options["cali_st"] * options["cali_n"]
    options["max_cache_gb"] = args.max_cache_gb
    return options


def load_unet(args, unet_cfg):
    if args.ckpt:
        from omegaconf import OmegaConf

        from ldm.util import load_model_from_config
        model = load_model_from_config(OmegaConf.load(args.config), args.ckpt, device="cpu")
        return model.model.diffusion_model, model.num_timesteps
    torch.manual_seed(args.seed)
    return instantiate_from_config(unet_cfg), 1000


def act_init_only(unet, config, params, rows, seed):
    """The first-reach activation init over ``rows`` synthetic rows (weights `max`, acts as configured)."""
    from quant import quantize_
    from quant.reconstruct.act_init import init_act_quantizers
    from quant.reconstruct.driver import CalibrationRows
    from quant.reconstruct.ptq import init_weight_quantizers

    calib = synthetic_calib(params, 1, max(rows // 2, 1), seed)
    qunet = quantize_(unet, config, [1])
    init_weight_quantizers(qunet, "max")
    data = CalibrationRows(calib["x"], calib["t"], calib.get("context"))
    start = time.perf_counter()
    init_act_quantizers(qunet.unet, data, len(data), seed, "cpu")
    return {"act_init_rows": len(data), "act_init_s": round(time.perf_counter() - start, 1)}


def _usage():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024 / GiB


def main(argv=None):
    args = build_parser().parse_args(argv)
    from omegaconf import OmegaConf

    from ldm.modules.diffusionmodules.util import make_ddim_timesteps
    from quant import make_config
    from quant.artifacts import load_artifact
    from quant.reconstruct import run_ptq

    torch.set_num_threads(args.threads)
    for path in (args.config, args.ckpt, args.calib):
        if path and not os.path.isfile(path):
            raise UserError(f"{path} does not exist.")
    unet_cfg = OmegaConf.load(args.config).model.params.unet_config
    params = OmegaConf.to_container(unet_cfg.params, resolve=True)
    if os.path.isdir(args.run_dir):
        shutil.rmtree(args.run_dir)
    start = time.perf_counter()
    unet, n_timesteps = load_unet(args, unet_cfg)
    unet = unet.eval().requires_grad_(False)
    report = {"config": args.config, "ckpt": args.ckpt, "preset": args.preset, "threads": args.threads,
              "unet_params": sum(p.numel() for p in unet.parameters()), "build_s": round(time.perf_counter() - start, 1),
              "w_bits": args.w_bits, "a_bits": args.a_bits}
    config = make_config("qdiffusion", w_bits=args.w_bits, a_bits=args.a_bits, **options_for(args))
    cpu0, _ = _usage()
    if args.act_init_rows:
        report.update(act_init_only(unet, config, params, args.act_init_rows, args.seed))
    else:
        calib = load_artifact(args.calib) if args.calib else synthetic_calib(params, config.cali_st, config.cali_n,
                                                                             args.seed)
        timesteps = [int(v) for v in make_ddim_timesteps("uniform", TIMESTEPS, n_timesteps, verbose=False)]
        start = time.perf_counter()
        qunet = run_ptq(unet, config, calib, args.run_dir, timesteps, progress=True,
                        model_id=None if args.ckpt else f"random-{args.seed}")
        units = {**qunet.ptq_log["weight"], **qunet.ptq_log["act"]}
        report.update({
            "rows": max(v.get("rows", 0) for v in units.values()), "weight_iters": config.weight_iters,
            "act_iters": config.act_iters, "batch": config.weight_batch, "micro_batch": config.micro_batch,
            "units": len(qunet.ptq_log["weight"]), "ptq_wall_s": round(time.perf_counter() - start, 1),
            "stage_wall_s": {k: round(v, 1) for k, v in qunet.ptq_log["times"].items()},
            "largest_unit_cache_mb": round(max(v.get("cache_peak_mb", 0.0) for v in units.values()), 1)})
    cpu1, peak = _usage()
    report.update({"cpu_s": round(cpu1 - cpu0, 1), "peak_rss_gb": round(peak, 2)})
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    cli_main(main)
