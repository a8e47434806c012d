"""Overhead of one quantized layer over the plain FP layer (MPQ-DM.md §13 shapes), printed as ratios.

Eval: no-grad forward while sampling (the quantized weight is cached). Train: forward + backward with an input
gradient and every trainable tensor (LoRA, weight Δ/z, activation Δ/z) receiving gradients. Median of repeats.
Usage: .venv/bin/python benchmarks/layer_overhead.py [--threads 2] [--repeats 30]
"""
import argparse
import statistics
import time

import torch

from quant.methods import omq
from quant.layers import LayerSpec, QuantConv2d, QuantLinear
from quant.quantizer import init_mse
from quant.step import step_scope

SHAPES = [("Conv2d 64->64 3x3", lambda: torch.nn.Conv2d(64, 64, 3, padding=1), (8, 64, 8, 8)),
          ("Conv2d 192->192 3x3", lambda: torch.nn.Conv2d(192, 192, 3, padding=1), (2, 192, 32, 32)),
          ("Linear 512->512", lambda: torch.nn.Linear(512, 512), (8, 64, 512))]


def _median_ratio(fn_q, fn_fp, repeats):
    """Median time of fn_q over median time of fn_fp, the two interleaved so machine load hits both alike."""
    for _ in range(3):
        fn_q()
        fn_fp()
    tq, tf = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn_fp()
        t1 = time.perf_counter()
        fn_q()
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        tq.append(t2 - t1)
    return statistics.median(tq) / statistics.median(tf)


def _quantized(fp, x, w_bits=2, a_bits=4):
    """An MPQ-DM layer at W2A4 with mixed {1,2,3} bits, smoothing, per-position LoRA r=32, 20 steps."""
    cls = QuantConv2d if isinstance(fp, torch.nn.Conv2d) else QuantLinear
    layer = cls.from_module(fp, LayerSpec(w_bits=w_bits, a_bits=a_bits, n_steps=20, lora_rank=32, smoothing=True),
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.smooth.copy_(omq.smoothing_factors(x, fp.weight))
        ws = layer.merged_weight()
        bits = omq.allocate(omq.kurtosis(ws), ws.shape[0] // 10, w_bits)
        d, z = init_mse(ws, bits, per_channel=True)
        layer.weight_quantizer.bits.copy_(bits)
        layer.weight_quantizer.delta.copy_(d)
        layer.weight_quantizer.zero.copy_(z)
        layer.act_quantizer.calibrate(layer.smooth_input(x))
        layer.lora.lora_B.normal_(0, 1e-3, generator=torch.Generator().manual_seed(1))
    layer.act_quantizer.make_temporal()
    return layer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} repeats={args.repeats} (median); ratios = quantized / FP")
    print(f"{'layer and input':<40} {'eval fwd':>9} {'train fwd+bwd':>14}")
    for label, make, shape in SHAPES:
        torch.manual_seed(0)
        fp = make()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        q = _quantized(fp, x)
        fp.requires_grad_(False)            # the FP weight is frozen in fine-tuning too; time only input grads

        def eval_fn(m):
            def run():
                with torch.no_grad(), step_scope(5):
                    m(x)
            return run

        def train_fn(m):
            def run():
                xi = x.clone().requires_grad_()
                with step_scope(5):
                    m(xi).sum().backward()
                m.zero_grad(set_to_none=True)
            return run

        ev = _median_ratio(eval_fn(q), eval_fn(fp), args.repeats)
        tr = _median_ratio(train_fn(q), train_fn(fp), args.repeats)
        print(f"{label + ', x ' + str(list(shape)):<40} {ev:>8.2f}x {tr:>13.2f}x")


if __name__ == "__main__":
    main()
