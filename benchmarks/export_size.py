"""Packed-export size and sampling memory: file bytes vs theoretical bytes, peak RSS packed vs float.

For each model (digits: the embedded checkpoint; cin256-v2: the full-size UNet with random weights, built from
the reference hparams) and each setting, the UNet is wrapped by the MPQ-DM layer policy, per-channel bits are set
directly (no calibration search: uniform b, a random OMQ split of the kurtosis ranking, or the MPQ-DM+ top-10%),
Δ/z come from `max` init, and `quant.export.export_quantized` writes the file. Theoretical bytes = Σ bits/8 over
quantized weights + every stored float tensor at its stored dtype (quant.export.theoretical_bytes); the ratio
shows the container overhead (header JSON, bit-width tags, < 1 byte of padding per layer).

Peak memory: a child process per mode runs a few UNet forwards at a tiny latent size (stated in the output);
"float" builds the FP UNet, "packed" loads the file (integers in memory, dequantized per layer per forward),
"packed-cached" loads with dequantize_at_load=True. Peak = VmHWM of the child.

    .venv/bin/python benchmarks/export_size.py --models digits,cin256-v2
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from ldm.util import UserError, atomic_write_bytes, cli_main, instantiate_from_config  # noqa: E402

CIN_CONFIG = "configs/latent-diffusion/cin256-v2.yaml"
DIGITS_CONFIG = "configs/latent-diffusion/digits-ldm-vq-4.yaml"
DIGITS_CKPT = "models/ldm/digits-ldm-vq-4/model.ckpt"
SETTINGS = ("W4", "W3", "W2", "W2-OMQ", "MPQ-DM+", "W2-OMQ-fp16")
TIMESTEPS = [1 + 50 * k for k in range(20)]       # DDIM 20 schedule; sizes the per-step activation quantizers
MiB = 1024 * 1024


def unet_config(model, args):
    """UNet {target, params} for a model name, or None (with a message) when it is unavailable."""
    if model == "cin256-v2":
        from omegaconf import OmegaConf
        unet = OmegaConf.load(os.path.join(REPO, CIN_CONFIG)).model.params.unet_config
        return OmegaConf.to_container(unet, resolve=True), None
    if model == "digits":
        if not os.path.isfile(args.digits_ckpt):
            print(f"skipping digits: no checkpoint at {args.digits_ckpt} (train it with scripts/train_digits_ldm.py)")
            return None, None
        from omegaconf import OmegaConf
        cfg = OmegaConf.to_container(OmegaConf.load(args.digits_config), resolve=True)
        return cfg["model"]["params"]["unet_config"], args.digits_ckpt
    raise UserError(f"unknown model {model!r}; choose from digits, cin256-v2.")


def build_unet(config, ckpt):
    torch.manual_seed(0)
    unet = instantiate_from_config(config).eval()
    if ckpt:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
        sd = obj.get("state_dict", obj)
        prefix = "model.diffusion_model."
        unet.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return unet.requires_grad_(False)


@torch.no_grad()
def set_setting(qunet, setting, seed=0):
    """Per-channel bits for the setting and `max`-init Δ/z on every wrapped layer (no calibration search)."""
    from quant.methods import omq
    from quant.api import make_config
    from quant.quantizer import init_max
    b = int(setting[1]) if setting.startswith("W") else 2
    method = "mpqdm+" if setting == "MPQ-DM+" else "mpqdm"
    qunet.config = make_config(method, w_bits=b, a_bits=4, lora_rank=0, omq=setting != f"W{b}")
    g = torch.Generator().manual_seed(seed)
    for _, layer in qunet.quant_layers():
        wq = layer.weight_quantizer
        w = layer.merged_weight()
        if layer.spec.role == "quant":
            if setting.startswith("W2-OMQ"):
                cand = omq.candidates(w.shape[0], "paper")
                m = cand[int(torch.randint(len(cand), (1,), generator=g))]
                wq.bits.copy_(omq.allocate(omq.kurtosis(w), m, b))
            elif setting == "MPQ-DM+":
                wq.bits.copy_(omq.allocate_plus(omq.kurtosis(w), b))
            else:
                wq.bits.fill_(b)
        delta, zero = init_max(w, wq.bits, per_channel=True)
        wq.delta.copy_(delta)
        wq.zero.copy_(zero)
        layer.clear_cache()


def size_rows(model, config, ckpt, settings, tmpdir, keep):
    from quant.api import make_config, quantize_
    from quant.export import export_quantized, theoretical_bytes
    t0 = time.time()
    unet = build_unet(config, ckpt)
    n_params = sum(p.numel() for p in unet.parameters())
    qunet = quantize_(unet, make_config("mpqdm", w_bits=2, a_bits=4, lora_rank=0), TIMESTEPS)
    print(f"[{model}] built and wrapped ({n_params:,} UNet params) in {time.time() - t0:.0f}s", flush=True)
    rows, kept = [], {}
    for setting in settings:
        t0 = time.time()
        set_setting(qunet, setting)
        path = os.path.join(tmpdir, f"{model}-{setting}.safetensors")
        header = export_quantized(qunet, path, unet_config=config,
                                  float_dtype="float16" if setting.endswith("fp16") else "float32")
        file_bytes = os.path.getsize(path)
        theo = theoretical_bytes(path)
        n_q = sum(l["shape"][0] * l["row_len"] for l in header["layers"].values())
        q_bits = sum(l["total_bits"] for l in header["layers"].values())
        omq_bits = [l for l in header["layers"].values() if l["role"] == "quant"]
        avg = sum(l["total_bits"] for l in omq_bits) / sum(l["shape"][0] * l["row_len"] for l in omq_bits)
        rows.append({"model": model, "setting": setting, "float_dtype": header["float_dtype"],
                     "file_bytes": file_bytes, "theoretical_bytes": int(round(theo)),
                     "ratio": file_bytes / theo, "avg_bits_quant_layers": avg,
                     "quantized_weights": n_q, "quantized_weight_bytes": q_bits / 8,
                     "fp32_unet_bytes": 4 * n_params, "compression_vs_fp32": 4 * n_params / file_bytes,
                     "export_seconds": round(time.time() - t0, 1)})
        print(f"[{model}] {setting}: {file_bytes / 1e6:.2f} MB, theoretical {theo / 1e6:.2f} MB, "
              f"ratio {file_bytes / theo:.4f}, avg bits {avg:.3f} ({time.time() - t0:.0f}s)", flush=True)
        if setting in keep:
            kept[setting] = path
        else:
            os.unlink(path)
    return rows, kept


def peak_rss_bytes():
    """High-water RSS of this process image: VmHWM (reset by exec, unlike ru_maxrss, which keeps the forked
    parent's size), falling back to ru_maxrss where /proc is unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_child(args):
    """Child process: report ru_maxrss after imports and after `forwards` UNet calls (one JSON line)."""
    from quant.export import load_export
    config = json.loads(args.child_config)
    base = peak_rss_bytes()
    t0 = time.time()
    if args.child == "float":
        model = build_unet(config, args.child_ckpt or None)
    else:
        model = load_export(args.child_file, config, dequantize_at_load=args.child == "packed-cached")
    ctx_dim = config["params"].get("context_dim")
    g = torch.Generator().manual_seed(0)
    s = args.spatial
    x = torch.randn(2, config["params"]["in_channels"], s, s, generator=g)
    ctx = None if ctx_dim is None else torch.randn(2, 1, ctx_dim, generator=g)
    with torch.no_grad():
        for k in range(args.forwards):
            t = torch.full((2,), TIMESTEPS[-1 - k], dtype=torch.long)
            x = model(x, t, context=ctx)
    peak = peak_rss_bytes()
    print(json.dumps({"baseline_rss_bytes": base, "peak_rss_bytes": peak, "seconds": round(time.time() - t0, 1)}))


def peak_rows(model, config, ckpt, path, args):
    rows = []
    for mode in ("float", "packed", "packed-cached"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--child-config", json.dumps(config),
               "--child-file", path or "", "--child-ckpt", ckpt or "", "--forwards", str(args.forwards),
               "--spatial", str(args.spatial)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd())
        if out.returncode != 0:
            raise RuntimeError(f"peak-memory child {mode} failed:\n{out.stderr[-2000:]}")
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"model": model, "mode": mode, "setting": "W2-OMQ", "forwards": args.forwards,
                     "latent": f"2x{config['params']['in_channels']}x{args.spatial}x{args.spatial}", **rec})
        print(f"[{model}] peak RSS {mode}: {rec['peak_rss_bytes'] / MiB:.0f} MiB "
              f"(after imports {rec['baseline_rss_bytes'] / MiB:.0f} MiB, {rec['seconds']}s)", flush=True)
    return rows


def merge_results(out_dir, size, peak, command):
    """Merge into an existing export_size.json: a (model, setting[, mode]) record replaces its old version, so
    models can be benchmarked in separate runs (e.g. digits rows added later)."""
    path = os.path.join(out_dir, "export_size.json")
    old = {"commands": [], "size": [], "peak_memory": []}
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)

    def merged(prev, new, key):
        fresh = {key(r) for r in new}
        return [r for r in prev if key(r) not in fresh] + new
    return {"commands": [c for c in old.get("commands", []) if c != command] + [command],
            "size": merged(old.get("size", []), size, lambda r: (r["model"], r["setting"])),
            "peak_memory": merged(old.get("peak_memory", []), peak, lambda r: (r["model"], r["mode"]))}


def write_results(out_dir, size, peak, command):
    os.makedirs(out_dir, exist_ok=True)
    data = merge_results(out_dir, size, peak, command)
    size, peak = data["size"], data["peak_memory"]
    atomic_write_bytes(os.path.join(out_dir, "export_size.json"), json.dumps(data, indent=1).encode())
    lines = ["# Packed export size and sampling memory", "", "Commands (each run merges its rows into this table):",
             *[f"- `{c}`" for c in data["commands"]], "",
             "Theoretical = Σ bits/8 over quantized weights + every stored float tensor (per-channel Δ/z float32, "
             "smoothing vectors, biases, per-step activation Δ/z, FP layers/norms/embeddings at the stored dtype). "
             "Ratio = file / theoretical (container overhead: header JSON, 4-bit per-channel tags, padding).", "",
             "Settings (MPQ-DM layer policy: the 4 W8A8 special layers at 8 bits, skip/downsample convs kept FP; "
             "Δ/z from `max` init, bits set directly, no calibration search):",
             "- W4 / W3 / W2: every OMQ layer at b bits.",
             "- W2-OMQ: bits {1,2,3} from the kurtosis ranking with a seeded random split m ∈ {0,g,..,5g} "
             "(g = Cout//10) per layer; average exactly 2 bits. W2-OMQ-fp16: same, FP tensors stored as float16.",
             "- MPQ-DM+: top Cout//10 kurtosis channels at 3 bits, the rest at 2 (average 2 + ~0.1).",
             "- Reference (EVALUATION.md §6): FP32 cin256-v2 UNet 1603.7 MB; W2 under this policy ≈ 155 MB with FP32 "
             "FP layers, ≈ 127 MB with FP16 FP layers and scales.", "",
             "| model | setting | FP tensors | avg bits (OMQ layers) | file MB | theoretical MB | ratio | vs FP32 UNet |",
             "|---|---|---|---|---|---|---|---|"]
    for r in size:
        lines.append(f"| {r['model']} | {r['setting']} | {r['float_dtype']} | {r['avg_bits_quant_layers']:.3f} | "
                     f"{r['file_bytes'] / 1e6:.2f} | {r['theoretical_bytes'] / 1e6:.2f} | {r['ratio']:.4f} | "
                     f"{r['compression_vs_fp32']:.1f}x |")
    if peak:
        lines += ["", "Peak RSS of a child process running a few UNet forwards (the 'sampling' stand-in: "
                  "batch 2 at the stated latent size, one forward per DDIM step from t=951 down).", "",
                  "| model | mode | latent | forwards | peak RSS MiB | RSS after imports MiB | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in peak:
            lines.append(f"| {r['model']} | {r['mode']} | {r['latent']} | {r['forwards']} | "
                         f"{r['peak_rss_bytes'] / MiB:.0f} | {r['baseline_rss_bytes'] / MiB:.0f} | {r['seconds']} |")
    atomic_write_bytes(os.path.join(out_dir, "export_size.md"), ("\n".join(lines) + "\n").encode())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits,cin256-v2")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--out-dir", default="results")
    p.add_argument("--digits-config", default=DIGITS_CONFIG)
    p.add_argument("--digits-ckpt", default=DIGITS_CKPT)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--keep-dir", help="write the exported files here and keep them (default: a temporary dir)")
    p.add_argument("--forwards", type=int, default=2)
    p.add_argument("--spatial", type=int, default=8, help="latent height/width of the memory forwards")
    p.add_argument("--child", choices=("float", "packed", "packed-cached"), help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-file", help=argparse.SUPPRESS)
    p.add_argument("--child-ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.child:
        return peak_child(args)
    settings = [s for s in args.settings.split(",") if s]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise UserError(f"unknown setting {bad[0]!r}; choose from {', '.join(SETTINGS)}.")
    command = ".venv/bin/python benchmarks/export_size.py " + " ".join(sys.argv[1:] if argv is None else argv)
    size, peak = [], []
    with tempfile.TemporaryDirectory(prefix="export_size_") as tmpdir:
        outdir = args.keep_dir or tmpdir
        os.makedirs(outdir, exist_ok=True)
        for model in [m for m in args.models.split(",") if m]:
            config, ckpt = unet_config(model, args)
            if config is None:
                continue
            keep = set(settings) if args.keep_dir else ({"W2-OMQ"} if not args.no_memory else set())
            rows, kept = size_rows(model, config, ckpt, settings, outdir, keep)
            size += rows
            if not args.no_memory and "W2-OMQ" in kept:
                peak += peak_rows(model, config, ckpt, kept["W2-OMQ"], args)
            if not args.keep_dir:
                for path in kept.values():
                    os.unlink(path)
    if not size:
        raise UserError("no model was available to benchmark.")
    write_results(args.out_dir, size, peak, command)
    print(f"wrote {os.path.join(args.out_dir, 'export_size.md')} and export_size.json")


if __name__ == "__main__":
    cli_main(main)
