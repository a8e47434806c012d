#!/usr/bin/env python
"""Gather several metrics.json files (from quant_scripts/05_evaluate.py) into a paper-style Markdown table.

One row per file: method, W/A bits, sampler and steps (read from the samples' meta when present), extractor,
sample count, IS, FID, sFID, precision, recall and conditional accuracy. With --baseline (the toolkit's own FP
run under the same protocol, EVALUATION.md pitfall 5) every row also gets its FID / sFID / IS deltas.
Writes OUT (Markdown, with the exact command at the bottom) and OUT with a .json suffix (the same rows).

Example:
  python scripts/make_table.py runs/fp.metrics.json runs/w4a4.metrics.json --baseline runs/fp.metrics.json \
      --out results/digits_table.md
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.evaluate import TABLE_COLUMNS, format_value  # noqa: E402
from ldm import cli  # noqa: E402
from ldm.util import UserError, atomic_write_bytes, cli_main, write_error  # noqa: E402

HEADERS = {"IS": "IS↑", "FID": "FID↓", "sFID": "sFID↓", "precision": "Precision↑", "recall": "Recall↑",
           "conditional_accuracy": "Cond. acc.↑"}


def _first(settings, *keys):
    for key in keys:
        if settings.get(key) is not None:
            return settings[key]
    return None


def read_result(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; pass metrics.json files written by quant_scripts/05_evaluate.py")
    try:
        with open(path) as fh:
            result = json.load(fh)
        result["metrics"], result["evaluator"]["extractor"], result["num_samples"]  # noqa: B018 (shape check)
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a metrics.json written by quant_scripts/05_evaluate.py")
    return result


def row_of(path, result, label=None):
    s = result.get("settings") or {}
    wb = _first(s, "weight_bits", "w_bits", "wbits", "n_bits_w")  # n_bits_*, quant_method: 04's samples meta
    ab = _first(s, "act_bits", "a_bits", "abits", "n_bits_a")
    steps = _first(s, "steps", "ddim_steps", "num_steps")
    sampler = _first(s, "sampler")
    return {
        "run": label or os.path.basename(path).replace(".metrics.json", ""),
        "method": _first(s, "method", "quant_method") or ("FP" if wb is None else "–"),
        "W/A": f"{wb}/{ab}" if wb is not None else "32/32" if _first(s, "method", "quant_method") in (None, "fp", "FP")
        else "–",
        "sampler": " ".join(str(v) for v in (sampler, steps) if v is not None) or "–",
        "extractor": result["evaluator"]["extractor"],
        "N": result["num_samples"],
        **{c: result["metrics"].get(c) for c in TABLE_COLUMNS},
        "source": path,
    }


def to_markdown(rows, baseline=None):
    show = [c for c in TABLE_COLUMNS if any(r[c] is not None for r in rows)]
    head = ["Run", "Method", "W/A", "Sampler", "Extractor", "N"] + [HEADERS[c] for c in show]
    if baseline:
        head += ["ΔIS", "ΔFID", "ΔsFID"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], str(r["method"]), r["W/A"], r["sampler"], r["extractor"], str(r["N"])]
        cells += [format_value(c, r[c]) for c in show]
        if baseline:
            for c, fmt in (("IS", "{:+.2f}"), ("FID", "{:+.3f}"), ("sFID", "{:+.3f}")):
                ok = r[c] is not None and baseline[c] is not None
                r[f"delta_{c}"] = r[c] - baseline[c] if ok else None
                cells.append(fmt.format(r[f"delta_{c}"]) if ok else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", metavar="METRICS.json", help="metrics files from 05_evaluate.py")
    p.add_argument("--out", required=True, help="Markdown table to write; the rows also go to OUT with .json")
    p.add_argument("--labels", nargs="*", default=None, help="row labels, one per METRICS.json (default: file names)")
    p.add_argument("--baseline", default=None, help="metrics.json of the FP baseline; adds ΔIS / ΔFID / ΔsFID")
    p.add_argument("--title", default=None, help="heading written above the table")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.metrics):
        raise UserError(f"--labels got {len(args.labels)} labels for {len(args.metrics)} metrics files")
    labels = args.labels or [None] * len(args.metrics)
    rows = [row_of(path, read_result(path), label) for path, label in zip(args.metrics, labels)]
    baseline = row_of(args.baseline, read_result(args.baseline)) if args.baseline else None
    extractors = {r["extractor"] for r in rows}
    text = (f"## {args.title}\n\n" if args.title else "") + to_markdown(rows, baseline)
    if len(extractors) > 1:
        text += f"\nWarning: rows use different feature extractors ({', '.join(sorted(extractors))}); not comparable.\n"
    command = " ".join(["python", "scripts/make_table.py"] + (argv if argv is not None else sys.argv[1:]))
    text += f"\nCommand: `{command}`\n"
    json_path = os.path.splitext(args.out)[0] + ".json"
    payload = {"rows": rows, "baseline": baseline, "command": command}
    for path, data in ((args.out, text.encode("utf-8")), (json_path, (json.dumps(payload, indent=2) + "\n").encode())):
        try:
            atomic_write_bytes(path, data)
        except OSError as err:
            raise write_error(path, err) from None
    print(text, end="")
    print(f"wrote {args.out} and {json_path}")


if __name__ == "__main__":
    cli_main(main)
