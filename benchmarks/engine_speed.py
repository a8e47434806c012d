"""Engine speed: latency per UNet call and per 20-step sample batch, peak memory and file size, for PyTorch FP,
OpenVINO FP and the OpenVINO int8 engine models; plus the digits engines' fidelity to the fake-quant model.

Models: the digits UNet (models/ldm/digits-ldm-vq-4; UNet batch 200 = 100 samples with CFG, as the preset samples)
and a cin256-v2-size UNet with random weights (batch 2 = one sample with CFG, 64x64x3 latents). Settings:
EfficientDM W8A8 / W4A8, MPQ-DM W4A8 / W2A4 (2-bit weights on the int8 grid). The digits engines come from
01 -> 02 with the digits preset in <work_dir>/digits/<setting> (finetuned.pt when 03 has been run there, else
naive.pt) -> 07; the cin ones from quantize_ + calibrate on random calibration tuples. Everything built is cached
under --work_dir, so a re-run only times (delete a folder to rebuild it).

Timing: all variants of one model live in one process and are called in interleaved rounds (one call each per
round), medians over rounds; one and two threads. "20-step batch" is a real DDIM 20-step CFG batch of 100
samples through the LDM for digits, 20 x the call median for cin (no autoencoder there). Peak memory: a child
process per variant loads/compiles it and runs 3 calls (VmHWM). Kernel counts: the compiled graph's convolutions
and matmuls by runtime precision (batch-independent helper convs excluded).

    .venv/bin/python benchmarks/engine_speed.py                      # everything (digits + cin256, 1 and 2 threads)
    .venv/bin/python benchmarks/engine_speed.py --models digits --threads 1 --no_fidelity
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import torch  # noqa: E402

from ldm.cli import ArgumentParser, positive_int  # noqa: E402
from ldm.util import UserError, atomic_write_bytes, cli_main  # noqa: E402

SETTINGS = {"edm-w8a8": ("efficientdm", 8, 8), "edm-w4a8": ("efficientdm", 4, 8),
            "mpq-w4a8": ("mpqdm", 4, 8), "mpq-w2a4": ("mpqdm", 2, 4)}
BATCH = {"digits": 200, "cin256-v2": 2}
CIN_CONFIG = "configs/latent-diffusion/cin256-v2.yaml"
MiB = 1024 * 1024


# -------------------------------------------------------------------------------------------- building
def digits_ldm():
    from ldm.presets import load_preset_model
    return load_preset_model("digits")


def cin_unet():
    from omegaconf import OmegaConf

    from ldm.training import deterministic_init_
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, CIN_CONFIG)).model.params.unet_config, resolve=True)
    return deterministic_init_(instantiate_from_config(cfg).eval(), seed=1).requires_grad_(False)


def shapes(model):
    return {"digits": ((3, 8, 8), (1, 64)), "cin256-v2": ((3, 64, 64), (1, 512))}[model]


def timesteps():
    from ldm.modules.diffusionmodules.util import make_ddim_timesteps
    return [int(t) for t in make_ddim_timesteps("uniform", 20, 1000, verbose=False)]


def build_digits(work, name, log):
    """runs 01 -> 02 (if needed) and 07 for one digits setting; returns the IR path."""
    run = os.path.join(work, "digits", name)
    xml = os.path.join(run, "engine_openvino", "unet.xml")
    if os.path.isfile(xml):
        return xml
    method, w, a = SETTINGS[name]
    py, qs = sys.executable, os.path.join(REPO, "quant_scripts")
    common = ["--preset", "digits", "--run_dir", run, "--threads", "1", "--no_progress"]
    steps = []
    if not os.path.isfile(os.path.join(run, "calib.pt")):
        steps.append([f"{qs}/01_collect_input_4_calib.py"])
    stage = "finetuned" if os.path.isfile(os.path.join(run, "finetuned.pt")) else "naive"
    if stage == "naive" and not os.path.isfile(os.path.join(run, "naive.pt")):
        steps.append([f"{qs}/02_quantize_ldm_naive.py", "--method", method, "--n_bits_w", str(w), "--n_bits_a", str(a)])
    steps.append([f"{qs}/07_deploy.py", "--stage", stage, "--no_check"])
    for cmd in steps:
        log(f"[digits/{name}] {os.path.basename(cmd[0])}")
        out = subprocess.run([py] + cmd + common, capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return xml


def save_fp_engine(unet, path, model):
    from quant.deploy import openvino as dov
    from quant.deploy.graph import build_fp_deploy_unet
    latent, ctx = shapes(model)
    ex = dov.example_inputs(2, latent, ctx, 0, timesteps()[0])
    dov.save(dov.convert(build_fp_deploy_unet(unet, timesteps()), ex), path,
             {"timesteps": timesteps(), "latent_shape": list(latent), "context_shape": list(ctx), "method": "fp"})


@torch.no_grad()
def cin_quantized(unet, name):
    """quantize_ + calibrate (one random calibration tuple at 64x64, a mid-schedule timestep) of a copy."""
    import copy

    from quant.api import make_config, quantize_
    from quant.stages.calibrate import calibrate
    method, w, a = SETTINGS[name]
    qunet = quantize_(copy.deepcopy(unet), make_config(method, w_bits=w, a_bits=a, lora_rank=0), timesteps())
    g = torch.Generator().manual_seed(0)
    calibrate(qunet, torch.randn(1, 3, 64, 64, generator=g), torch.tensor([timesteps()[10]]),
              torch.randn(1, 1, 512, generator=g))
    return qunet.eval()


def build_cin(work, names, log):
    """Random-weight cin256-size UNet: FP engine + one engine per setting (cached); returns {name: path}."""
    from quant.deploy import openvino as dov
    from quant.deploy.describe import decide_modes, describe_unet, mode_counts
    from quant.deploy.graph import build_deploy_unet
    paths = {n: os.path.join(work, "cin256-v2", n, "unet.xml") for n in ["fp"] + names}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    unet = cin_unet()
    if not os.path.isfile(paths["fp"]):
        log("[cin256-v2] FP engine")
        save_fp_engine(unet, paths["fp"], "cin256-v2")
    for name in names:
        if os.path.isfile(paths[name]):
            continue
        t0 = time.time()
        qunet = cin_quantized(unet, name)
        layers = describe_unet(qunet)
        policy, isa = decide_modes(layers)
        ex = dov.example_inputs(2, (3, 64, 64), (1, 512), 10, timesteps()[10])
        method, w, a = SETTINGS[name]
        dov.save(dov.convert(build_deploy_unet(qunet, layers), ex), paths[name],
                 {"timesteps": timesteps(), "method": method, "w_bits": w, "a_bits": a, "wide_policy": policy,
                  "isa": isa, "modes": mode_counts(layers), "latent_shape": [3, 64, 64], "context_shape": [1, 512]})
        log(f"[cin256-v2] {name}: built in {time.time() - t0:.0f}s, parts {mode_counts(layers)}")
        del qunet, layers
    return paths


# ---------------------------------------------------------------------------------------------- timing
@functools.lru_cache(maxsize=None)
def cpu_label():
    """The CPU model and its int8-relevant instruction sets (the int8 kernels differ with VNNI / AMX)."""
    from quant.deploy.describe import cpu_int8_isa
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
    except OSError:
        pass
    isa = cpu_int8_isa()
    return f"{name} ({', '.join(isa['flags']) or 'no AVX2'}; int8 dot products: " \
           f"{'VNNI' if isa['vnni'] else 'AMX' if isa['amx'] else 'none, 16-bit AVX2 sums'})"


def file_bytes(path):
    return os.path.getsize(path) + os.path.getsize(path[:-4] + ".bin")


def variant_name(name, streams):
    """openvino-<setting> in latency mode (one stream), openvino-<setting>-<n>streams in throughput mode."""
    return ("openvino-fp" if name == "fp" else f"openvino-{name}") + (f"-{streams}streams" if streams > 1 else "")


def load_variants(model, engines, threads, streams=(1,)):
    """{variant: module(x, t, context=ctx) -> eps}, PyTorch FP first, then every engine at every stream count that
    the thread count allows (a stream needs a thread)."""
    from quant.deploy.openvino import load_engine_unet
    torch.set_num_threads(threads)
    unet = digits_ldm().model.diffusion_model if model == "digits" else cin_unet()
    variants = {"pytorch-fp": unet}
    for n in [s for s in streams if s <= threads]:
        for name, path in engines.items():
            variants[variant_name(name, n)] = load_engine_unet(path, threads=threads, streams=n)
    return variants


def interleaved(fns, rounds, warmup=1):
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}


@torch.no_grad()
def time_model(model, engines, threads, rounds, log, streams=(1,)):
    from quant.deploy.openvino import EngineUNet, int8_summary, kernel_precisions
    variants = load_variants(model, engines, threads, streams)
    latent, ctx = shapes(model)
    g = torch.Generator().manual_seed(0)
    b = BATCH[model]
    x, c = torch.randn((b,) + latent, generator=g), torch.randn((b,) + ctx, generator=g)
    t = torch.full((b,), timesteps()[10], dtype=torch.long)
    calls = {k: (lambda m=m: m(x, t, context=c)) for k, m in variants.items()}
    per_call = interleaved(calls, rounds)
    batch20 = {}
    if model == "digits":
        from ldm.models.diffusion.ddim import DDIMSampler
        ldm = digits_ldm()
        labels = torch.arange(100) % 10
        cond = ldm.get_learned_conditioning({"class_label": labels})
        uncond = ldm.get_learned_conditioning({"class_label": torch.full_like(labels, 10)})
        noise = torch.randn((100,) + latent, generator=g)

        def sample(m):
            ldm.model.diffusion_model = m
            DDIMSampler(ldm).sample(S=20, batch_size=100, shape=list(latent), conditioning=cond, eta=0.0, x_T=noise,
                                    unconditional_guidance_scale=3.0, unconditional_conditioning=uncond,
                                    verbose=False, progress=False)
        batch20 = interleaved({k: (lambda m=m: sample(m)) for k, m in variants.items()}, max(3, rounds // 3), 0)
    rows = []
    for k, (med, lo, hi) in per_call.items():
        m = variants[k]
        row = {"model": model, "variant": k, "threads": threads, "batch": b, "cpu": cpu_label(), "call_ms": 1e3 * med,
               "call_min_ms": 1e3 * lo, "call_max_ms": 1e3 * hi, "rounds": rounds,
               "batch20_s": batch20[k][0] if k in batch20 else 20 * med, "batch20_measured": k in batch20}
        if isinstance(m, EngineUNet):
            counts = kernel_precisions(m.compiled)
            row["kernels"] = counts
            row["int8_kernels"], row["f32_kernels"] = int8_summary(counts)
            row["file_bytes"] = file_bytes(m.path)
            row["modes"] = m.header.get("modes")
            row["streams"] = len(m.requests)
        else:
            row["file_bytes"] = sum(v.numel() * v.element_size() for v in m.state_dict().values())
        rows.append(row)
        log(f"[{model}] {threads} thr {k:22s} {row['call_ms']:9.1f} ms/call (min {row['call_min_ms']:.1f}, "
            f"max {row['call_max_ms']:.1f})  20-step {row['batch20_s']:.2f} s")
    return rows


# ---------------------------------------------------------------------------------------------- memory
def peak_rss_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@torch.no_grad()
def memory_child(args):
    model, variant, path = args.child
    torch.set_num_threads(1)
    base = peak_rss_bytes()
    if variant == "pytorch-fp":
        m = digits_ldm().model.diffusion_model if model == "digits" else cin_unet()
    else:
        from quant.deploy.openvino import load_engine_unet
        m = load_engine_unet(path, threads=1)
    latent, ctx = shapes(model)
    b = BATCH[model]
    x, c = torch.randn((b,) + latent), torch.randn((b,) + ctx)
    for k in range(3):
        m(x, torch.full((b,), timesteps()[k], dtype=torch.long), context=c)
    print(json.dumps({"baseline_rss_bytes": base, "peak_rss_bytes": peak_rss_bytes()}))


def memory_rows(model, engines, log):
    rows = []
    for variant, path in [("pytorch-fp", "")] + [("openvino-fp" if n == "fp" else f"openvino-{n}", p)
                                                  for n, p in engines.items()]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", model, variant, path]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{out.stderr[-2000:]}")
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"model": model, "variant": variant, "cpu": cpu_label(), **rec})
        log(f"[{model}] peak RSS {variant}: {rec['peak_rss_bytes'] / MiB:.0f} MiB")
    return rows


# -------------------------------------------------------------------------------------------- fidelity
def fidelity_rows(work, names, threads, log):
    """Per digits setting: max |Δε| engine vs fake-quant (20 steps, batch 200), and 1,000 samples from the same
    noise by the fake-quant model and by the engine: PSNR between them, accuracy and FID of each."""
    import copy

    from evaluation.digits_report import digits_row_metrics
    from ldm.generate import generate_samples
    from quant.api import load_quantized
    from quant.deploy.openvino import load_engine_unet
    torch.set_num_threads(threads)
    ldm = digits_ldm()
    fp_unet = ldm.model.diffusion_model
    fp_npz = os.path.join(work, "digits", "fp_samples.npz")

    def sample(unet, out):
        ldm.model.diffusion_model = unet
        generate_samples(ldm, out, n_samples=1000, batch_size=100, ddim_steps=20, eta=0.0, scale=3.0, seed=0,
                         progress=False)
    sample(fp_unet, fp_npz)
    rows = []
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(200, 3, 8, 8, generator=g), torch.randn(200, 1, 64, generator=g)
    for name in names:
        run = os.path.join(work, "digits", name)
        stage = "finetuned" if os.path.isfile(os.path.join(run, "finetuned.pt")) else "naive"
        qunet, _ = load_quantized(copy.deepcopy(fp_unet), os.path.join(run, f"{stage}.pt"))
        qunet.eval()
        engine = load_engine_unet(os.path.join(run, "engine_openvino", "unet.xml"), threads=threads)
        with torch.no_grad():
            steps = [torch.full((200,), s) for s in timesteps()]
            diffs = [float((engine(x, t, c) - qunet(x, t, context=c)).abs().max()) for t in steps]
        fq_npz, en_npz = os.path.join(run, "fakequant_samples.npz"), os.path.join(run, "engine_samples.npz")
        sample(qunet, fq_npz)
        sample(engine, en_npz)
        fq, en = digits_row_metrics(fq_npz, fp_npz), digits_row_metrics(en_npz, fq_npz)
        rows.append({"setting": name, "stage": stage, "cpu": cpu_label(), "max_abs_eps_diff": max(diffs),
                     "median_step_max_abs_eps_diff": statistics.median(diffs),
                     "psnr_engine_vs_fakequant": en["PSNR_fp"], "fid_engine_vs_fakequant": en["FID_fp"],
                     "acc_fakequant": fq["conditional_accuracy"], "acc_engine": en["conditional_accuracy"],
                     "fid_fakequant": fq["FID"], "fid_engine": en["FID"], "psnr_fakequant_vs_fp": fq["PSNR_fp"]})
        log(f"[digits] {name}: max|Δε| {max(diffs):.4f}, PSNR engine/fake {en['PSNR_fp']:.2f} dB, acc "
            f"{100 * fq['conditional_accuracy']:.1f}% -> {100 * en['conditional_accuracy']:.1f}%, FID "
            f"{fq['FID']:.3f} -> {en['FID']:.3f}")
    return rows


# -------------------------------------------------------------------------------------------- TensorRT
@torch.no_grad()
def tensorrt_check(work, names, log):
    """CUDA: the cin256-size Q/DQ ONNX -> TensorRT engine (INT8 convs/linears, FP16 elsewhere); median latency of
    one call at batch 2 against PyTorch FP32 and FP16 on the same GPU, and max |Δε| to the fake-quant model."""
    import copy

    from quant.deploy import onnx_qdq, require
    from quant.deploy.describe import decide_modes, describe_unet
    from quant.deploy.graph import build_deploy_unet
    from quant.deploy.openvino import example_inputs
    require("tensorrt", "TensorRT")
    if not torch.cuda.is_available():
        raise UserError("--tensorrt needs a CUDA device.")
    unet = cin_unet()
    x, t, c, _ = example_inputs(2, (3, 64, 64), (1, 512), 10, timesteps()[10])
    fp32, fp16 = copy.deepcopy(unet).cuda(), copy.deepcopy(unet).half().cuda()
    xg, tg, cg = x.cuda(), t.cuda(), c.cuda()

    def median_ms(f):
        for _ in range(3):
            f()
        times = []
        for _ in range(20):
            torch.cuda.synchronize()
            start = time.perf_counter()
            f()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)
    log(f"[tensorrt] pytorch-fp32: {median_ms(lambda: fp32(xg, tg, context=cg)):.2f} ms/call (batch 2)")
    log(f"[tensorrt] pytorch-fp16: {median_ms(lambda: fp16(xg.half(), tg, context=cg.half())):.2f} ms/call")
    del fp32, fp16
    for name in names:
        onnx_path = os.path.join(work, "cin256-v2", name, "unet_qdq.onnx")
        qunet = cin_quantized(unet, name)
        if not os.path.isfile(onnx_path):
            layers = describe_unet(qunet)
            decide_modes(layers, "int8", {"vnni": True, "amx": False, "flags": ["cuda"]})  # int32 sums on the GPU
            onnx_qdq.export_onnx(build_deploy_unet(qunet, layers, "qdq"), (x, t, c, torch.tensor(10)), onnx_path,
                                 {"timesteps": timesteps()})
        plan = onnx_path[:-5] + ".plan"
        if not os.path.isfile(plan):
            onnx_qdq.build_tensorrt_engine(onnx_path, plan, batch=2)
        feed = {"x": xg, "timesteps": tg, "context": cg, "step": torch.tensor(10, device="cuda")}
        seconds, out = onnx_qdq.time_tensorrt_engine(plan, feed)
        fake = qunet(x, t, context=c)
        log(f"[tensorrt] {name}: {1e3 * seconds:.2f} ms/call, max |Δε| to fake-quant "
            f"{float((out.cpu() - fake).abs().max()):.4f} (|ε| max {float(fake.abs().max()):.3f})")


# --------------------------------------------------------------------------------------------- results
def _merge(old, new, key):
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def write_results(out_dir, command, speed, memory, fidelity, load):
    """Merge into engine_speed.json (a re-run replaces its own rows) and rewrite engine_speed.md from it."""
    path = os.path.join(out_dir, "engine_speed.json")
    data = {"commands": [], "speed": [], "memory": [], "fidelity": []}
    if os.path.isfile(path):
        with open(path) as fh:
            data.update(json.load(fh))
    for r in speed + memory + fidelity:
        r["command"] = command
    data["speed"] = _merge(data["speed"], speed, lambda r: (r["model"], r["variant"], r["threads"]))
    data["memory"] = _merge(data["memory"], memory, lambda r: (r["model"], r["variant"]))
    data["fidelity"] = _merge(data["fidelity"], fidelity, lambda r: r["setting"])
    # the commands that made the rows now in the file, in order of first appearance
    data["commands"] = list(dict.fromkeys(r["command"] for part in ("speed", "memory", "fidelity")
                                          for r in data[part] if r.get("command")))
    if speed:
        data["load_average_at_end"] = load
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())
    lines = ["# Engine speed: the quantized UNet on OpenVINO's int8 kernels (CPU)", "",
             "Made by (each run replaces its own rows; listed: the commands whose rows are here):",
             *[f"- `{c}`" for c in data["commands"]], "",
             f"Machine: {os.cpu_count()} CPU cores shared with other developers (1-minute load average "
             f"{data.get('load_average_at_end') or 0:.2f} at the end of the last timing run): timings are noisy; "
             "every variant is called in the same interleaved rounds and the ratios are of medians.", ""]
    for model in sorted({r["model"] for r in data["speed"]}):
        for th in sorted({r["threads"] for r in data["speed"] if r["model"] == model}):
            rows = [r for r in data["speed"] if r["model"] == model and r["threads"] == th]
            base = {r["variant"]: r["call_ms"] for r in rows}
            mem = {r["variant"]: r for r in data["memory"] if r["model"] == model}
            cpus = sorted({r.get("cpu", "not recorded") for r in rows})
            mem_cpus = sorted({r.get("cpu", "not recorded") for r in mem.values()} - set(cpus))
            lines += [f"## {model}, batch {rows[0]['batch']}, {th} thread(s), {rows[0]['rounds']} rounds", "",
                      f"CPU: {'; '.join(cpus)}" + (f"; peak RSS measured on: {'; '.join(mem_cpus)}" if mem_cpus
                                                   else ""), "",
                      "| variant | ms / call (median, min–max) | 20-step batch s | vs PyTorch FP | vs OpenVINO FP | "
                      "int8 / f32 kernels | file MB | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                m = mem.get(r["variant"])
                kern = f"{r['int8_kernels']} / {r['f32_kernels']}" if "int8_kernels" in r else "–"
                # engines against OpenVINO FP at the same stream count; PyTorch FP against the latency-mode one
                ov_fp = variant_name("fp", r.get("streams", 1))
                vs_ov = f"{base[ov_fp] / r['call_ms']:.2f}x" if ov_fp in base else "–"
                lines.append(f"| {r['variant']} | {r['call_ms']:.1f} ({r['call_min_ms']:.1f}–{r['call_max_ms']:.1f}) "
                             f"| {r['batch20_s']:.2f}{'' if r['batch20_measured'] else ' (20×call)'} | "
                             f"{base['pytorch-fp'] / r['call_ms']:.2f}x | {vs_ov} | {kern} | "
                             f"{r['file_bytes'] / 1e6:.1f} | {m['peak_rss_bytes'] / MiB:.0f} |" if m else
                             f"| {r['variant']} | {r['call_ms']:.1f} ({r['call_min_ms']:.1f}–{r['call_max_ms']:.1f}) "
                             f"| {r['batch20_s']:.2f}{'' if r['batch20_measured'] else ' (20×call)'} | "
                             f"{base['pytorch-fp'] / r['call_ms']:.2f}x | {vs_ov} | {kern} | "
                             f"{r['file_bytes'] / 1e6:.1f} | – |")
            lines.append("")
    if any(r.get("streams", 1) > 1 for r in data["speed"]):
        lines += ["Variants named `-<n>streams` run in OpenVINO's throughput mode: n CPU streams sharing the weights, "
                  "the threads divided among them, the batch cut into n slices that run at once (`load_engine_unet("
                  "..., streams=n)`, `04 --engine_streams n`); their \"vs OpenVINO FP\" is against the FP graph "
                  "with the same streams.", ""]
    if data["fidelity"]:
        lines += ["## Fidelity of the digits engines to the fake-quant model", "",
                  "max |Δε|: engine vs fake-quant PyTorch on the same inputs (batch 200, all 20 steps). Samples: "
                  "1,000 digits, DDIM 20, CFG 3.0, seed 0, the same noise for every model; accuracy and FID by "
                  "the digits CNN against the training digits. CPU: "
                  f"{'; '.join(sorted({f.get('cpu', 'not recorded') for f in data['fidelity']}))}.", "",
                  "| setting | stage | max abs Δε (median step) | PSNR engine vs fake-quant dB | acc fake-quant | "
                  "acc engine | FID fake-quant | FID engine |", "|---|---|---|---|---|---|---|---|"]
        for f in data["fidelity"]:
            lines.append(f"| {f['setting']} | {f['stage']} | {f['max_abs_eps_diff']:.4f} "
                         f"({f['median_step_max_abs_eps_diff']:.4f}) | {f['psnr_engine_vs_fakequant']:.2f} | "
                         f"{100 * f['acc_fakequant']:.1f}% | {100 * f['acc_engine']:.1f}% | {f['fid_fakequant']:.3f} | "
                         f"{f['fid_engine']:.3f} |")
    atomic_write_bytes(os.path.join(out_dir, "engine_speed.md"), ("\n".join(lines) + "\n").encode())


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits,cin256-v2", help="comma list of digits, cin256-v2")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list of " + ", ".join(SETTINGS))
    p.add_argument("--threads", default="1,2", help="comma list of thread counts to time")
    p.add_argument("--streams", default="1,2",
                   help="comma list of OpenVINO stream counts to time each engine at (1: latency mode, the batch on "
                        "all threads; n > 1: n streams running batch slices at once; counts above the thread count "
                        "are skipped)")
    p.add_argument("--rounds", type=positive_int, default=9, help="interleaved timing rounds (medians)")
    p.add_argument("--work_dir", default="runs/engine", help="cache of run dirs, engine models and samples")
    p.add_argument("--out_dir", default="results", help="where engine_speed.md/json go")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--no_fidelity", action="store_true", help="skip the digits fidelity (sampling 1,000 x 9)")
    p.add_argument("--no_timing", action="store_true", help="skip the latency rounds (e.g. fidelity only)")
    p.add_argument("--tensorrt", action="store_true",
                   help="GPU check instead: cin256-size Q/DQ ONNX -> TensorRT INT8 engine, latency vs PyTorch on CUDA")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return memory_child(args)
    names = [s for s in args.settings.split(",") if s]
    bad = [s for s in names if s not in SETTINGS] + [m for m in args.models.split(",") if m not in BATCH]
    if bad:
        raise UserError(f"unknown setting or model {bad[0]!r}; settings: {', '.join(SETTINGS)}; models: digits, "
                        "cin256-v2.")
    threads = [positive_int(t) for t in args.threads.split(",") if t]
    streams = [positive_int(t) for t in args.streams.split(",") if t]
    command = ".venv/bin/python benchmarks/engine_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    work = os.path.abspath(args.work_dir)

    def log(msg):
        print(msg, flush=True)
    if args.tensorrt:
        return tensorrt_check(work, names, log)
    from quant.deploy import require
    require("openvino", "OpenVINO")
    speed, memory, fidelity = [], [], []
    for model in [m for m in args.models.split(",") if m]:
        if model == "digits":
            engines = {"fp": os.path.join(work, "digits", "fp", "unet.xml")}
            if not os.path.isfile(engines["fp"]):
                save_fp_engine(digits_ldm().model.diffusion_model, engines["fp"], "digits")
            engines.update({n: build_digits(work, n, log) for n in names})
        else:
            engines = build_cin(work, names, log)
        for th in [] if args.no_timing else threads:
            speed += time_model(model, engines, th, args.rounds, log, streams)
        if not args.no_memory:
            memory += memory_rows(model, engines, log)
        if model == "digits" and not args.no_fidelity:
            fidelity = fidelity_rows(work, names, 1, log)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_results(args.out_dir, command, speed, memory, fidelity, load)
    print(f"wrote {os.path.join(args.out_dir, 'engine_speed.md')} and engine_speed.json")


if __name__ == "__main__":
    cli_main(main)
