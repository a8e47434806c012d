#!/usr/bin/env python
"""Sampling throughput of the digits model on the CPU: 2 processes (torchrun) against 1, in one run.

Each configuration samples the same images (same seed, same shards) with ldm.generate.generate_samples; the
timed region starts after the model is loaded and all processes have met at a barrier, and ends when the
merged .npz is written. Both runs use the same cores: one process with 2 threads vs two with 1 thread each
(plus one process with 1 thread, for reference). Prints samples/s and the ratio; the merged files are also
compared (they must be identical).

  python benchmarks/sampling_throughput.py [--n_samples 200] [--batch_size 25] [--ddim_steps 20]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    from ldm.generate import generate_samples
    from ldm.presets import load_preset_model

    model = load_preset_model("digits", "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        dist.barrier()
    t0 = time.perf_counter()
    generate_samples(model, args.out, n_samples=args.n_samples, batch_size=args.batch_size,
                     ddim_steps=args.ddim_steps, eta=0.0, scale=3.0, seed=0, shard_size=args.batch_size,
                     progress=False)
    elapsed = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"seconds": elapsed}))
    if world > 1:
        torch.distributed.destroy_process_group()


def run(nproc, threads, args, out):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(args.port)]
    cmd += [os.path.abspath(__file__), "--worker", "--threads", str(threads), "--out", out,
            "--n_samples", str(args.n_samples), "--batch_size", str(args.batch_size),
            "--ddim_steps", str(args.ddim_steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if res.returncode != 0:
        sys.exit(f"run with {nproc} process(es) failed:\n{res.stderr[-2000:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)["seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_samples", type=int, default=400, help="images per configuration")
    p.add_argument("--batch_size", type=int, default=25, help="images per sampler call (= shard size)")
    p.add_argument("--ddim_steps", type=int, default=20, help="DDIM steps (eta 0, guidance 3.0)")
    p.add_argument("--port", type=int, default=29531, help="torchrun rendezvous port")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, nproc, threads in [("1 process x 2 threads", 1, 2), ("1 process x 1 thread", 1, 1),
                                     ("2 processes x 1 thread", 2, 1)]:
            out = os.path.join(tmp, f"{nproc}p{threads}t.npz")
            seconds = run(nproc, threads, args, out)
            results[name] = (seconds, out)
            print(f"{name:>24}: {args.n_samples / seconds:7.2f} samples/s ({seconds:.1f} s)", flush=True)
        base, two = results["1 process x 2 threads"], results["2 processes x 1 thread"]
        with np.load(base[1]) as a, np.load(two[1]) as b:
            same = all(np.array_equal(a[k], b[k]) for k in ("arr_0", "arr_1"))
        print(f"throughput ratio, 2 processes / 1 process (same 2 cores): {base[0] / two[0]:.2f}x; "
              f"vs 1 process x 1 thread: {results['1 process x 1 thread'][0] / two[0]:.2f}x; "
              f"identical samples: {same}")


if __name__ == "__main__":
    main()
