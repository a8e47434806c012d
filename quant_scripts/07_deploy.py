"""Stage 7: run the quantized UNet on the integer kernels of an engine -> run_dir/engine_<engine>/unet.{xml,onnx}.

Takes a run_dir artifact (naive.pt or finetuned.pt, any method) or a packed export (06's export.safetensors) and
writes one engine model that carries OUR integers and scales: weights as signed int8 codes (c − z) with their
per-channel Δ (MPQ-DM's mixed {b−1, b, b+1} channels on the int8 grid, zero points snapped as 06 does, LoRA
merged, smoothing 1/s folded into the quantizer's input scale), every sampling step's activation (Δ, z) in ONE
graph with the step index as an input, the layers the method keeps FP as float ops, GroupNorm as
reshape + layer_norm + affine. Engines (optional extra: pip install -e ".[deploy]"):
  openvino  OpenVINO IR for the CPU (int8 convs/linears; sample with load_engine_unet)
  onnx      ONNX with Q/DQ for TensorRT explicit quantization (checked here with ONNX Runtime on the CPU)
8-bit weight ranges overflow the 16-bit sums of AVX2 int8 kernels on CPUs without VNNI/AMX; --wide decides
those layers: requantized per channel to the safe range (auto on such CPUs), kept FP, or run as int8 anyway.
"""
import os

# _common first: it puts the repository root on sys.path
from _common import (PRESET_NAMES, add_stage_flag, artifact_path, build_student, load_fp_model,  # noqa: F401
                     load_quantized_artifact, unet_config)
from ldm import cli
from ldm.cli import ArgumentParser, positive_int
from ldm.util import UserError, cli_main

ENGINES = {"openvino": "unet.xml", "onnx": "unet.onnx"}


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cin256-v2", choices=PRESET_NAMES,
                   help="model preset (gives the FP model: autoencoder, conditioning, UNet config)")
    p.add_argument("--run_dir", required=True, help="run directory holding naive.pt / finetuned.pt")
    add_stage_flag(p, "deploy")
    p.add_argument("--from_export", default=None, metavar="PATH",
                   help="deploy a packed export (06_export_packed.py) instead of a run_dir artifact")
    p.add_argument("--engine", choices=sorted(ENGINES), default="openvino",
                   help="openvino: OpenVINO IR for the CPU; onnx: Q/DQ ONNX for TensorRT (default: openvino)")
    p.add_argument("--out", default=None, help="output file (default: run_dir/engine_<engine>/unet.xml|.onnx)")
    p.add_argument("--wide", choices=["auto", "requant", "fp", "int8"], default="auto",
                   help="layers whose weight range overflows the CPU's int8 sums (8-bit weights without VNNI): "
                        "requant = per-channel requantization to the safe range, fp = keep them float, int8 = as "
                        "they are (right only with VNNI/AMX); auto = int8 with VNNI/AMX, else requant (onnx: "
                        "TensorRT sums in int32, so only 8-bit weights with |c - z| > 127 are requantized)")
    p.add_argument("--batch", type=positive_int, default=2,
                   help="batch of the traced example call (the engine's batch dimension stays dynamic)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for the check call")
    p.add_argument("--device", type=cli.device, default="cpu", help="torch device to build on (default cpu)")
    p.add_argument("--no_check", action="store_true",
                   help="skip compiling the result and comparing one call with the fake-quant model")
    p.add_argument("--no_progress", action="store_true", help="accepted for symmetry with 01-06 (no bar here)")
    p.add_argument("--config", default=None, help=__import__("argparse").SUPPRESS)
    p.add_argument("--ckpt", default=None, help=__import__("argparse").SUPPRESS)
    return p


def load_quantized(args, model, ident):
    """(QuantUNet, meta in artifact terms, source path) from --from_export or the run_dir artifact."""
    if args.from_export:
        from quant.export import load_export, read_header
        path = os.path.abspath(args.from_export)
        header = read_header(path)
        extra = header.get("extra", {})
        if extra.get("config_hash") not in (None, ident["config_hash"]):
            raise UserError(f"{path} was exported from a model with config hash {extra.get('config_hash')}, but "
                            f"--preset {args.preset} has {ident['config_hash']}.")
        qunet = load_export(path, unet_config(args), device="cpu")
        meta = {"method": header["method"], "n_bits_w": header["w_bits"], "n_bits_a": header["a_bits"],
                "timesteps": header["timesteps"], "config_hash": ident["config_hash"]}
        return qunet, meta, path
    args.stage, art = load_quantized_artifact(args, ident)
    meta, source = art["meta"], os.path.abspath(artifact_path(args, args.stage))
    if meta.get("stage") != args.stage:
        raise UserError(f"{source} is a {meta.get('stage')!r} artifact, not {args.stage!r}.")
    return build_student(model, meta, art["state_dict"], copy_unet=False), meta, source


def example_context(model):
    """Context shape (without batch) of the UNet call (class or text conditioning: the unconditional context's),
    or None for an unconditional model."""
    from ldm.pipelines import adapter_for
    context = adapter_for(model).uncond(1)
    return None if context is None else tuple(context.shape[1:])


def main(argv=None):
    import torch

    args = build_parser().parse_args(argv)
    from quant.deploy import require
    require("openvino" if args.engine == "openvino" else "onnx",
            "OpenVINO" if args.engine == "openvino" else "The onnx package")
    args.device = args.device or "cpu"
    model, ident = load_fp_model(args)
    qunet, meta, source = load_quantized(args, model, ident)
    qunet = qunet.cpu().eval()

    from quant.deploy.describe import decide_modes, describe_unet, mode_counts
    from quant.deploy.graph import build_deploy_unet
    from quant.deploy.openvino import example_inputs

    layers = describe_unet(qunet)
    # TensorRT accumulates int8 products in int32 (no 16-bit pair sums): only |q| > 127 needs requantizing there
    target_isa = {"vnni": True, "amx": False, "flags": ["tensorrt-int32"]} if args.engine == "onnx" else None
    policy, isa = decide_modes(layers, args.wide, target_isa)
    deploy = build_deploy_unet(qunet, layers, "openvino" if args.engine == "openvino" else "qdq")
    latent = (int(model.channels), int(model.image_size), int(model.image_size))
    timesteps = list(qunet.table.timesteps)
    example = example_inputs(args.batch, latent, example_context(model), len(timesteps) // 2,
                             timesteps[len(timesteps) // 2])
    header = {"method": meta["method"], "w_bits": meta["n_bits_w"], "a_bits": meta["n_bits_a"],
              "timesteps": timesteps, "config_hash": meta["config_hash"], "preset": args.preset,
              "source": source, "wide_policy": policy, "isa": isa, "modes": mode_counts(layers),
              "max_weight_deviation": max(p.weight.max_dev for l in layers for p in l.parts),
              "max_act_zero_snap": max((p.act.zero_snap for l in layers for p in l.parts if p.act), default=0.0),
              "latent_shape": list(latent), "context_shape": None if example[2] is None else list(example[2].shape[1:])}
    out = args.out or os.path.join(args.run_dir, f"engine_{args.engine}", ENGINES[args.engine])
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory; give a file path such as {out}/{ENGINES[args.engine]}.")
    if args.engine == "openvino":
        from quant.deploy import openvino as ov_engine
        if not out.endswith(".xml"):
            raise UserError(f"--out for the openvino engine must end in .xml, got {out}.")
        ov_engine.save(ov_engine.convert(deploy, example), out, header)
        runner = None if args.no_check else ov_engine.load_engine_unet(out, threads=args.threads)
    else:
        from quant.deploy import onnx_qdq
        onnx_qdq.export_onnx(deploy, example, out, header)
        runner = None if args.no_check else onnx_qdq.OrtUNet(out, threads=args.threads)
    size = os.path.getsize(out) + (os.path.getsize(out[:-4] + ".bin") if out.endswith(".xml") else 0)
    print(f"wrote {out} ({size / 1e6:.2f} MB): {header['modes']} parts (int8 exact / requant = int8 after "
          f"requantization / fp), wide-weight policy {policy} (CPU flags {isa['flags']}), weights moved by at most "
          f"{header['max_weight_deviation']:.3g}, activation zero points snapped by at most "
          f"{header['max_act_zero_snap']:.3g}")
    if runner is not None:
        x, t, ctx, _ = example
        with torch.no_grad():
            ref = qunet(x, t, context=ctx)
            got = runner(x, t, ctx)
        line = f"check at t={int(t[0])}: max |eps_engine - eps_fakequant| = {float((got - ref).abs().max()):.4g}"
        if args.engine == "openvino":
            from quant.deploy.openvino import int8_summary, kernel_precisions
            low, high = int8_summary(kernel_precisions(runner.compiled))
            line += f"; compiled kernels: {low} int8, {high} f32"
        print(line)
    return out


if __name__ == "__main__":
    cli_main(main)
