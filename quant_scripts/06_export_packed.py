"""Ship the quantized UNet as a really low-bit file -> run_dir/export.safetensors (quant.export).

Integer weights packed at their real bit widths (MPQ-DM's per-channel {b-1, b, b+1} groups included), LoRA merged,
per-channel Δ/z, smoothing vectors, per-step activation scales keyed by timestep, and a JSON header that names the
method, the bits of every layer, the layer policy and the model config hash. Sample from it with
`04_sample_lora_model.py --from_export PATH`.

The fake quantizer keeps a float zero point z, so a fine-tuned channel can take 2^b + 1 distinct values, which b bits
cannot hold. The export therefore first rounds every z to the integer that moves the fewest clipped weights
(quant.export.snap_zero_points_; fine-tuning moves z by ~1e-6 per step, so this touches only clipped weights, by
|z − ẑ|·Δ) and prints how many weights changed; the packed file is then bitwise the snapped model.
"""
import os

# _common first: it puts the repository root on sys.path
from _common import (A_BITS, MADE_BY, W_BITS, add_stage_flag, agree, artifact_path, build_student, check_ident,
                     load_fp_model, load_quantized_artifact, model_config, parser, prepare_output, prepare_run_dir,
                     unet_config)
from ldm.util import UserError, cli_main, write_error


def build_parser():
    p = parser(__doc__, {"float_dtype": "float32"})
    add_stage_flag(p, "export")
    p.add_argument("--out", default=None, help="output file (default: run_dir/export.safetensors)")
    p.add_argument("--float16", action="store_true",
                   help="store the unquantized tensors (FP layers, norms, biases, embeddings) as float16")
    p.add_argument("--method", choices=["efficientdm", "mpqdm", "mpqdm+"], help="must match the artifact if given")
    p.add_argument("--n_bits_w", type=W_BITS, help="must match the artifact if given")
    p.add_argument("--n_bits_a", type=A_BITS, help="must match the artifact if given")
    return p


def check_args(args):
    """Cross-flag rules, from the flags and the model config alone (before any model is loaded); returns the
    output path."""
    model_config(args)  # readable, and its targets allowed
    out = args.out or os.path.join(args.run_dir, "export.safetensors")
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory; give a file path such as {out}/export.safetensors.")
    return out


def main(argv=None):
    from quant.export import export_quantized, snap_zero_points_, theoretical_bytes

    args = build_parser().parse_args(argv)
    out = check_args(args)
    prepare_run_dir(args)
    prepare_output(out, "export")
    args.stage, art = load_quantized_artifact(args)
    meta = art["meta"]
    agree(args, meta, {"method": "method", "n_bits_w": "n_bits_w", "n_bits_a": "n_bits_a"}, f"{args.stage} artifact")
    model, ident = load_fp_model(args)
    source = os.path.abspath(artifact_path(args, args.stage))
    check_ident(art, ident, args.stage, source)
    fp_bytes = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.state_dict().values())
    qunet = build_student(model, meta, art["state_dict"], copy_unet=False, what=f"{args.stage} artifact {source}",
                          made_by=MADE_BY[args.stage])
    moved = snap_zero_points_(qunet)
    try:
        export_quantized(qunet, out, unet_config(args), float_dtype="float16" if args.float16 else "float32",
                         extra_meta={"preset": args.preset, "config_hash": meta["config_hash"], "stage": args.stage,
                                     "quant_artifact": source, "parent": {args.stage: meta["checksum"]},
                                     "max_weight_change_by_zero_point_rounding": moved})
    except OSError as err:
        raise write_error(out, err) from None
    size, ideal = os.path.getsize(out), theoretical_bytes(out)
    print(f"wrote {out}: {size / 1e6:.3f} MB (theoretical {ideal / 1e6:.3f} MB, ratio {size / ideal:.4f}); "
          f"float32 UNet {fp_bytes / 1e6:.3f} MB, {fp_bytes / size:.1f}x smaller; rounding the zero points to "
          f"integers changed quantized weights by at most {moved:.3g}")
    return out


if __name__ == "__main__":
    cli_main(main)
