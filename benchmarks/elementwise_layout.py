"""Engine graph rule 5, measured: OpenVINO's CPU element-wise kernels on 4D maps with short rows vs the rows view.

SiLU and x*2+1 on the same 819,200 floats laid out as [200, 64, 8, 8] (the digits UNet's 8x8 level), its rows view
[200, 64, 64], [200, 64, 4, 4] and its rows view [200, 16, 64], and [50, 64, 16, 16]; one compiled model per case,
all called in interleaved rounds on one thread, medians; the node's own time from OpenVINO's per-node counters (so
the copy of the input into the request is left out). Needs the deploy extra.
Usage: .venv/bin/python benchmarks/elementwise_layout.py [--rounds 7] [--threads 1]
"""
import statistics
import warnings

import numpy as np
import torch

from ldm.cli import ArgumentParser, positive_int
from ldm.util import cli_main

CASES = [("8x8 map", (200, 64, 8, 8)), ("8x8 as rows", (200, 64, 64)), ("4x4 map", (200, 64, 4, 4)),
         ("4x4 as rows", (200, 16, 64)), ("16x16 map", (50, 64, 16, 16))]
OPS = {"silu": torch.nn.functional.silu, "x*2+1": lambda x: x * 2 + 1}


def node_ms(request, feed):
    request.infer(feed)
    return 1e3 * sum(p.real_time.total_seconds() for p in request.profiling_info)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds (medians)")
    p.add_argument("--threads", type=positive_int, default=1, help="OpenVINO inference threads")
    args = p.parse_args(argv)
    from quant.deploy import require
    ov = require("openvino", "OpenVINO")
    core, requests = ov.Core(), {}
    for op_name, fn in OPS.items():
        class Op(torch.nn.Module):
            def forward(self, x):
                return fn(x)
        for label, shape in CASES:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ov.convert_model(Op(), example_input=(x,))
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True,
                                                         "PERFORMANCE_HINT": "LATENCY",
                                                         "INFERENCE_NUM_THREADS": args.threads})
            requests[op_name, label] = (compiled.create_infer_request(), {0: x.numpy()}, x.numel())
    times = {k: [] for k in requests}
    for _ in range(args.rounds + 1):   # the first round warms up
        for k, (request, feed, _) in requests.items():
            times[k].append(node_ms(request, feed))
    print(f"| op | layout | shape | ms (median of {args.rounds}) | ns / element |\n|---|---|---|---|---|")
    for (op_name, label), values in times.items():
        ms, n = statistics.median(values[1:]), requests[op_name, label][2]
        shape = dict(CASES)[label]
        print(f"| {op_name} | {label} | {list(shape)} | {ms:.2f} | {1e6 * ms / n:.2f} |")


if __name__ == "__main__":
    cli_main(main)
