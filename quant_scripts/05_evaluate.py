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

Example:
  python quant_scripts/05_evaluate.py digits-heldout outputs/digits_samples.npz --extractor digits
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.evaluate import EXTRACTORS, TABLE_HEADER, evaluate_npz, table_row  # noqa: E402
from ldm.util import UserError, atomic_write_bytes, cli_main  # noqa: E402

EXTRACTOR = "inception"  # the paper protocol; use "digits" for the embedded digits benchmark
IS_SPLIT_SIZE = None  # None: 5000 (ADM) for inception, min(5000, N) for digits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", metavar="REF", help="reference .npz, or digits-train / digits-heldout (digits only)")
    p.add_argument("samples", metavar="SAMPLES.npz", help="samples: arr_0 uint8 [N,H,W,3], optional arr_1, meta")
    p.add_argument("--extractor", choices=EXTRACTORS, default=EXTRACTOR,
                   help="feature network: inception (paper protocol) or digits (embedded benchmark); "
                        "default %(default)s")
    p.add_argument("--out", default=None,
                   help="where to write the metrics JSON (default: SAMPLES.metrics.json beside the samples)")
    p.add_argument("--inception-weights", default=None,
                   help="InceptionV3 weights file (default: $MPQDM_INCEPTION_WEIGHTS, else torch-fidelity's cache)")
    p.add_argument("--digits-weights", default=None,
                   help="digits CNN weights (default: models/evaluation/digits_cnn.safetensors)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per feature-extractor batch (default: 64 inception, 500 digits)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--is-split-size", type=int, default=IS_SPLIT_SIZE,
                   help="IS split size (default: 5000 for inception as ADM, min(5000, N) for digits)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute reference features instead of reading / writing the cache beside REF")
    p.add_argument("--no-precomputed", action="store_true",
                   help="ignore mu/sigma stored in REF and use statistics of its images instead")
    p.add_argument("--label", default=None, help="row label of the printed table row (default: samples file name)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.is_split_size is not None and args.is_split_size < 1:
        raise UserError(f"--is-split-size must be positive, got {args.is_split_size}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = args.inception_weights if args.extractor == "inception" else args.digits_weights
    result = evaluate_npz(args.ref, args.samples, args.extractor, weights_path=weights, batch_size=args.batch_size,
                          device=device, is_split_size=args.is_split_size, use_cache=not args.no_cache,
                          use_precomputed=not args.no_precomputed, progress=not args.no_progress)
    result["command"] = " ".join(["python", "quant_scripts/05_evaluate.py"] + list(argv if argv is not None
                                                                                   else sys.argv[1:]))
    out = args.out or os.path.splitext(args.samples)[0] + ".metrics.json"
    atomic_write_bytes(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    print(TABLE_HEADER)
    print(table_row(result, args.label))
    print(f"wrote {out}")


if __name__ == "__main__":
    cli_main(main)
