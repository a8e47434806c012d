"""Cost of MPQ-DM fine-tuning and quantized sampling; prints ratios, asserts nothing.

Part 1 (default, digits model; random weights with the digits config if the checkpoint is absent):
  - one fine-tuning iteration (teacher forward, student forward+backward, TRD, AdamW) vs one FP forward+backward
    of the same UNet on the same CFG batch;
  - the quantized UNet's eval forward vs the FP forward (sampling cost).
Part 2 (--cin_smoke, heavy: run only on an idle machine): quant_scripts 01 -> 04 on a cin256-v2-size LDM with
random weights (2 calibration steps, a 2-step schedule with 1 epoch of B=1, 1 sample), each stage in its own
process on --device, reporting wall time, peak RSS (os.wait4 rusage ru_maxrss) and, on CUDA, the stage's
torch.cuda.max_memory_allocated; exits non-zero when a stage fails (benchmarks/gpu_check.sh relies on it).

--measure SCRIPT ARGS...: run one script in this process and print `[measure] SCRIPT: exit E, wall W s, peak CUDA
C MiB, peak RSS R MiB` (the per-step line of benchmarks/gpu_check.sh); the exit status is the script's.

    .venv/bin/python benchmarks/finetune_cost.py [--threads 2] [--method mpqdm --w 2 --a 4]
    .venv/bin/python benchmarks/finetune_cost.py --cin_smoke --work_dir /tmp/cin_smoke [--device cuda]
    .venv/bin/python benchmarks/finetune_cost.py --measure quant_scripts/01_collect_input_4_calib.py --preset digits ...
"""
import argparse
import copy
import os
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ldm.training import deterministic_init_  # noqa: E402

DIGITS_CONFIG = os.path.join(REPO, "configs/latent-diffusion/digits-ldm-vq-4.yaml")
DIGITS_CKPT = os.path.join(REPO, "models/ldm/digits-ldm-vq-4/model.ckpt")
CIN_CONFIG = os.path.join(REPO, "configs/latent-diffusion/cin256-v2.yaml")


def _median_time(fn, repeats):
    fn()  # warm-up (allocator, kernel selection, quantized-weight cache)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def digits_model():
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config, load_model_from_config
    config = OmegaConf.load(DIGITS_CONFIG)
    if os.path.isfile(DIGITS_CKPT):
        return load_model_from_config(config, DIGITS_CKPT), "digits checkpoint"
    torch.manual_seed(0)
    model = instantiate_from_config(config.model).eval()
    deterministic_init_(model.model, seed=1)
    return model, "digits config, random weights (checkpoint absent)"


def part_digits(args):
    from ldm.modules.diffusionmodules.util import make_ddim_timesteps
    from quant.api import make_config, quantize_
    from quant.stages.calibrate import calibrate
    from quant.stages.finetune import FinetuneConfig, guided_eps
    from quant.stages.optim import param_groups
    from quant.methods.trd import TRD

    model, source = digits_model()
    model.requires_grad_(False)
    teacher = model.model.diffusion_model
    steps = 20
    timesteps = [int(t) for t in make_ddim_timesteps("uniform", steps, model.num_timesteps, verbose=False)]
    opts = {"w_bits": args.w, "a_bits": args.a}
    student = quantize_(copy.deepcopy(teacher), make_config(args.method, **opts), timesteps)
    gen = torch.Generator().manual_seed(0)
    n_cls = model.cond_stage_model.embedding.num_embeddings - 1
    x = torch.randn(32, 3, 8, 8, generator=gen)
    labels = torch.randint(0, n_cls + 1, (32,), generator=gen)
    context = model.get_learned_conditioning({"class_label": labels})
    calibrate(student, x, torch.tensor(timesteps).repeat(2)[:32], context)
    groups = param_groups(student)

    b = args.batch_size
    x = torch.randn(b, 3, 8, 8, generator=gen)
    c_lab = torch.randint(0, n_cls, (b,), generator=gen)
    c = model.get_learned_conditioning({"class_label": c_lab})
    uc = model.get_learned_conditioning({"class_label": torch.full_like(c_lab, n_cls)})
    t = timesteps[10]
    opt = torch.optim.AdamW([dict(g) for g in groups], lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01)
    trd = TRD(teacher, student, mode=args.trd_mode, window=2)
    cfg = FinetuneConfig(ddim_steps=steps)
    state = {"p": 0}

    def ft_iteration():  # one iteration as the loop does it, on a TRD-due step half of the time
        if state["p"] % 2 == 0:
            trd.reset()
        with trd.capture():
            with torch.no_grad():
                e_fp = guided_eps(model, teacher, x, t, c, uc, cfg.guidance_scale)
            e_q = guided_eps(model, student, x, t, c, uc, cfg.guidance_scale)
        loss = (e_q - e_fp).pow(2).sum()
        extra = trd.step_loss(state["p"] % 2)
        if extra is not None and extra.requires_grad:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["p"] += 1

    fp_params = [p for p in teacher.parameters()]

    def fp_train_iteration():  # FP forward+backward of the same batch (what plain fine-tuning would cost)
        for p in fp_params:
            p.requires_grad_(True)
        e = guided_eps(model, teacher, x, t, c, uc, cfg.guidance_scale)
        e.pow(2).sum().backward()
        for p in fp_params:
            p.grad = None
            p.requires_grad_(False)

    student.train()
    t_ft = _median_time(ft_iteration, args.repeats)
    t_fp_train = _median_time(fp_train_iteration, args.repeats)
    trd.remove()
    student.eval()
    xx, tt, cc = torch.cat([x, x]), torch.full((2 * b,), t), torch.cat([uc, c])
    with torch.no_grad():
        t_fp = _median_time(lambda: teacher(xx, tt, context=cc), args.repeats * 3)
        t_q = _median_time(lambda: student(xx, tt, context=cc), args.repeats * 3)
    print(f"model: {source}; method {args.method} W{args.w}A{args.a}, TRD {args.trd_mode}; UNet batch {2 * b} "
          f"(B={b} with CFG); torch threads {torch.get_num_threads()}")
    print(f"fine-tuning iteration        {t_ft * 1e3:9.1f} ms  = {t_ft / t_fp_train:5.2f}x FP forward+backward "
          f"({t_fp_train * 1e3:.1f} ms)")
    print(f"  -> {steps}-step epoch ~ {t_ft * steps:.2f} s; 30 epochs ~ {t_ft * steps * 30 / 60:.1f} min")
    print(f"quantized eval forward       {t_q * 1e3:9.1f} ms  = {t_q / t_fp:5.2f}x FP forward ({t_fp * 1e3:.1f} ms)")


def measure(argv):
    """Run the script argv[0] with arguments argv[1:] in this process (as `python SCRIPT ARGS`), then print its
    wall time, peak CUDA memory and peak RSS; exit with the script's status."""
    if not argv:
        raise SystemExit("--measure needs a script path")
    script = argv[0]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # what `python SCRIPT` puts first
    sys.argv = list(argv)
    start, code = time.perf_counter(), 1
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:  # also after a traceback, so a failing step still reports
        cuda = (f"{torch.cuda.max_memory_allocated() / 2 ** 20:.1f} MiB"
                if torch.cuda.is_available() and torch.cuda.is_initialized() else "n/a")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        line = (f"[measure] {script}: exit {code}, wall {time.perf_counter() - start:.1f} s, peak CUDA {cuda}, "
                f"peak RSS {rss:.0f} MiB")
        print(line, flush=True)
        if os.environ.get("GPU_CHECK_MEASURE_FILE"):  # benchmarks/gpu_check.sh collects the lines here
            with open(os.environ["GPU_CHECK_MEASURE_FILE"], "a") as fh:
                fh.write(line + "\n")
    sys.exit(code)


def _run_stage(cmd, env):
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024.0  # KiB -> MiB on Linux


def part_cin_smoke(args):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    work = args.work_dir or tempfile.mkdtemp(prefix="cin_smoke_")
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, "random_cin256.ckpt")
    if not os.path.isfile(ckpt):
        torch.manual_seed(0)
        model = instantiate_from_config(OmegaConf.load(CIN_CONFIG).model)
        deterministic_init_(model.model, seed=1)
        torch.save({"state_dict": model.state_dict()}, ckpt)
        del model
    common = ["--preset", "cin256-v2", "--config", CIN_CONFIG, "--ckpt", ckpt, "--run_dir", os.path.join(work, "run"),
              "--device", args.device, "--no_progress"]
    py, qs = sys.executable, os.path.join(REPO, "quant_scripts")
    stages = [
        ("01 calibration", [f"{qs}/01_collect_input_4_calib.py", "--calib_steps", "2", "--calib_batch", "1"]),
        ("02 naive", [f"{qs}/02_quantize_ldm_naive.py", "--method", args.method, "--n_bits_w", str(args.w),
                      "--n_bits_a", str(args.a), "--n_calib", "2", "--train_steps", "2"]),
        ("03 fine-tune", [f"{qs}/03_train_mpqdm.py", "--epochs", "1", "--batch_size", "1", "--preview_every", "0"]),
        ("04 sampling", [f"{qs}/04_sample_lora_model.py", "--n_samples", "1", "--batch_size", "1", "--classes", "1"]),
    ]
    env = dict(os.environ)
    print(f"cin256-v2-size smoke run in {work} (random weights, device {args.device})")
    for name, cmd in stages:
        code, secs, rss = _run_stage([py, os.path.abspath(__file__), "--measure"] + cmd + common, env)
        print(f"{name:16s} exit {code}  {secs:7.1f} s  peak RSS {rss:8.0f} MiB", flush=True)
        if code != 0:
            sys.exit(f"cin256-v2-size smoke: stage {name} failed with exit status {code}")


def main():
    if sys.argv[1:2] == ["--measure"]:
        return measure(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="mpqdm", choices=["efficientdm", "mpqdm", "mpqdm+"])
    p.add_argument("--w", type=int, default=2, help="weight bits")
    p.add_argument("--a", type=int, default=4, help="activation bits")
    p.add_argument("--trd_mode", default="paper", choices=["paper", "released", "off"])
    p.add_argument("--batch_size", type=int, default=8, help="B trajectories (digits preset: 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cin_smoke", action="store_true", help="run part 2 (heavy) instead of part 1")
    p.add_argument("--work_dir", default=None, help="part 2 working directory (random checkpoint, run dir)")
    p.add_argument("--device", default="cpu", help="part 2: torch device of the stages (cpu, cuda, cuda:N)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cin_smoke:
        part_cin_smoke(args)
    else:
        part_digits(args)


if __name__ == "__main__":
    main()
