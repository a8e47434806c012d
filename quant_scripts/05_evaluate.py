#!/usr/bin/env python
"""Step 05: evaluate a sample .npz against a reference batch and write metrics.json.

Computes IS, FID, sFID, precision and recall (k = 3) the way the ADM evaluator does, plus conditional
accuracy for class-conditional digits samples (labels in arr_1). SAMPLES.npz holds arr_0 = uint8 [N,H,W,3]
(optionally arr_1 = labels [N] and meta = a JSON string of the sampling settings, copied into the result).

REF is an ADM reference .npz (e.g. VIRTUAL_imagenet256_labeled.npz: images in arr_0 and/or precomputed
mu/sigma, mu_s/sigma_s), or, with --extractor digits, the literal `digits-train` or `digits-heldout` meaning
the real digits split of ldm.data.digits. Reference features are cached next to the reference file.

Extractors: `inception` = torch-fidelity's PyTorch port of the TF InceptionV3 used by the ADM evaluator (the
paper protocol; weights file from torch-fidelity's cache, --inception-weights or $MPQDM_INCEPTION_WEIGHTS);
`digits` = the shipped digits CNN (IS split size min(5000, N), since the digits sets are small).

Text-to-image samples (a `prompts` array, as 04 and scripts/txt2img.py write them): `--clip [MODEL_DIR]` adds the CLIP
score (evaluation/clip_score.py: CLIP ViT-L/14 from MODEL_DIR, else $MPQDM_CLIP_MODEL, models/clip/... or the Hugging
Face cache; the variant, formula and truncation rule go into the metrics JSON); REF is then optional (give it for
FID as well, e.g. a reference made from COCO images by evaluation/image_folder.py). For the embedded digits text
model, `--extractor digits` reports the prompt accuracy (the digits CNN against the digit each prompt names), its
stand-in for the CLIP score. CIFAR-10: REF is the CIFAR-10 train set as an .npz of uint8 images (arr_0) or of
precomputed Inception statistics (mu, sigma), scored with `--extractor inception` (torch-fidelity's resize to 299).

Examples:
  python quant_scripts/05_evaluate.py digits-heldout outputs/digits_samples.npz --extractor digits
  python quant_scripts/05_evaluate.py runs/sd/samples.npz --clip /models/clip-vit-large-patch14
  python quant_scripts/05_evaluate.py cifar10_train.npz runs/cifar/samples.npz --extractor inception
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.clip_score import VARIANTS as CLIP_VARIANTS  # noqa: E402
from evaluation.evaluate import EXTRACTORS, TABLE_HEADER, evaluate_npz, table_row  # noqa: E402
from ldm import cli  # noqa: E402
from ldm.util import UserError, atomic_write_bytes, cli_main, ensure_writable_dir, write_error  # noqa: E402

EXTRACTOR = "inception"  # the paper protocol; use "digits" for the embedded digits benchmark
IS_SPLIT_SIZE = None  # None: 5000 (ADM) for inception, min(5000, N) for digits
PR_DISTANCES = "auto"  # ADM's float16 distance blocks for ADM reference batches (Inception), else float32


def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="[REF] SAMPLES.npz",
                   help="REF: reference .npz, or digits-train / digits-heldout (digits only); optional with --clip. "
                        "SAMPLES.npz: arr_0 uint8 [N,H,W,3], optional arr_1, prompts, meta")
    p.add_argument("--clip", nargs="?", const="", default=None, metavar="MODEL_DIR",
                   help="CLIP score of a text-to-image sample file (CLIP ViT-L/14 from MODEL_DIR, else the default "
                        "locations); give it after the file names")
    p.add_argument("--clip-variant", dest="clip_variant", choices=sorted(CLIP_VARIANTS), default="toolkit",
                   help="CLIP score variant (default toolkit: 100 cos, mean over samples, the mean clamped at 0, "
                        "prompts truncated to 77 tokens); recorded in the metrics JSON")
    p.add_argument("--extractor", choices=EXTRACTORS, default=EXTRACTOR,
                   help="feature network: inception (paper protocol) or digits (embedded benchmark); "
                        "default %(default)s")
    p.add_argument("--out", default=None,
                   help="where to write the metrics JSON (default: SAMPLES.metrics.json beside the samples)")
    p.add_argument("--inception-weights", default=None,
                   help="InceptionV3 weights file (default: $MPQDM_INCEPTION_WEIGHTS, else torch-fidelity's cache)")
    p.add_argument("--digits-weights", default=None,
                   help="digits CNN weights (default: models/evaluation/digits_cnn.safetensors)")
    p.add_argument("--batch-size", type=cli.positive_int, default=None,
                   help="images per feature-extractor batch (default: 64 inception, 500 digits)")
    p.add_argument("--device", type=cli.device, default=None,
                   help="torch device: cuda, cuda:N, cpu or mps (default: cuda if available, else cpu)")
    p.add_argument("--is-split-size", type=cli.positive_int, default=IS_SPLIT_SIZE,
                   help="IS split size (default: 5000 for inception as ADM, min(5000, N) for digits)")
    p.add_argument("--pr-distances", choices=["auto", "fp16", "fp32"], default=PR_DISTANCES,
                   help="precision/recall distances: fp16 = the ADM evaluator's float16 distance blocks (its "
                        "published numbers), fp32 = exact; auto (default) = fp16 for an ADM reference batch with "
                        "inception, else fp32; recorded in the metrics JSON")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute reference features instead of reading / writing the cache beside REF")
    p.add_argument("--no-precomputed", action="store_true",
                   help="ignore mu/sigma stored in REF and use statistics of its images instead")
    p.add_argument("--label", default=None, help="row label of the printed table row (default: samples file name)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if len(args.paths) > 2 or (len(args.paths) == 1 and args.clip is None):
        raise UserError("give REF and SAMPLES.npz (REF may be left out only with --clip).")
    if args.clip and args.clip.endswith(".npz"):
        raise UserError(f"--clip took {args.clip} as its model folder; put --clip after the file names.")
    args.ref, args.samples = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    return args


def main(argv=None):
    args = parse_args(argv)
    from ldm.util import resolve_device

    out = args.out or os.path.splitext(args.samples)[0] + ".metrics.json"
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory; give a file path.")
    ensure_writable_dir(os.path.dirname(os.path.abspath(out)), "directory of the metrics file", clean=False)
    device = str(resolve_device(args.device))
    result = {"metrics": {}, "samples": {"path": os.path.abspath(args.samples)}}
    if args.ref is not None:
        weights = args.inception_weights if args.extractor == "inception" else args.digits_weights
        result = evaluate_npz(args.ref, args.samples, args.extractor, weights_path=weights,
                              batch_size=args.batch_size, device=device, is_split_size=args.is_split_size,
                              use_cache=not args.no_cache, use_precomputed=not args.no_precomputed,
                              progress=not args.no_progress, pr_distances=args.pr_distances)
        prompt_accuracy(result, args)
    if args.clip is not None:
        from evaluation.clip_score import clip_score_npz

        clip = clip_score_npz(args.samples, args.clip or None, args.clip_variant, device=device,
                              batch_size=args.batch_size or 64)
        result["clip"] = clip
        result["metrics"]["clip_score"] = clip["clip_score"]
    result["command"] = " ".join(["python", "quant_scripts/05_evaluate.py"] + list(argv if argv is not None
                                                                                   else sys.argv[1:]))
    try:
        atomic_write_bytes(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except OSError as err:
        raise write_error(out, err) from None
    if args.ref is not None:
        print(TABLE_HEADER)
        print(table_row(result, args.label))
    if args.clip is not None:
        print(f"CLIP score ({result['clip']['variant']}: {result['clip']['formula']}, {result['clip']['model']}): "
              f"{result['clip']['clip_score']:.4f} over {result['clip']['num_samples']} samples")
    print(f"wrote {out}")


def prompt_accuracy(result, args):
    """Text samples scored by the digits CNN: their conditional accuracy is the prompt accuracy (arr_1 holds the
    digit each prompt names), the embedded model's stand-in for the CLIP score."""
    from evaluation.npz_io import npz_keys

    metrics = result["metrics"]
    if args.extractor == "digits" and "prompts" in npz_keys(args.samples) and "conditional_accuracy" in metrics:
        metrics["prompt_accuracy"] = metrics["conditional_accuracy"]
        result["prompt_accuracy_rule"] = ("digits CNN argmax == the digit named by each image's prompt "
                                          "(stand-in for the CLIP score)")


if __name__ == "__main__":
    cli_main(main)
