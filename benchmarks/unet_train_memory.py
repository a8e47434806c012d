#!/usr/bin/env python
"""Training memory of the SD v1 UNet (860 M parameters) per forward + backward, without running it at full size.

The UNet is built on the `meta` device (shapes only, no memory, no compute) and run forward under
torch.autograd.graph.saved_tensors_hooks; the bytes of the distinct non-parameter storages autograd keeps for
backward are the activation memory of one training step. That count depends only on shapes, which --check
verifies: at a reduced size the same count from a real CPU run must be identical. The table adds the fp32
parameters, their gradients and Adam's two moments (full fine-tuning), and the largest transient of the backward
(the gradient of one attention-probability tensor, which exists next to the saved activations).

    python benchmarks/unet_train_memory.py                 # SD v1 at 512^2 (latent 64x64), batch 1, 2, 4
    python benchmarks/unet_train_memory.py --check         # + the meta count against a real reduced-size run
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ldm.cli import ArgumentParser, positive_int  # noqa: E402
from ldm.util import atomic_write_bytes, cli_main, instantiate_from_config  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30


def unet_config(path, model_channels=None, context_dim=None):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)["model"]["params"]["unet_config"]
    if model_channels:
        cfg["params"]["model_channels"] = model_channels
    if context_dim:
        cfg["params"]["context_dim"] = context_dim
    return cfg


def saved_activation_bytes(cfg, batch, latent, grad_checkpoint, device):
    """(parameter count, bytes of non-parameter storages saved for backward, largest attention map in bytes)."""
    from ldm.modules.attention import BasicTransformerBlock

    cfg = json.loads(json.dumps(cfg))
    cfg["params"]["use_checkpoint"] = grad_checkpoint
    with torch.device(device):
        torch.manual_seed(0)
        unet = instantiate_from_config(cfg)
    for module in unet.modules():  # CompVis checkpoints transformer blocks always; follow the flag instead
        if isinstance(module, BasicTransformerBlock):
            module.checkpoint = grad_checkpoint
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    gen = torch.Generator().manual_seed(0)
    ctx_dim = cfg["params"]["context_dim"]
    x = torch.randn(batch, cfg["params"]["in_channels"], latent, latent, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    c = torch.randn(batch, 77, ctx_dim, generator=gen).to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, context=c)
    heads = cfg["params"]["num_heads"]
    attn = batch * heads * latent ** 4 * 4  # [B*heads, HW, HW] fp32 at the full-resolution level
    return sum(p.numel() for p in unet.parameters()), sum(saved.values()), attn


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml", help="model config")
    p.add_argument("--latent", type=positive_int, default=64, help="latent side (64 = 512^2 images)")
    p.add_argument("--batches", type=positive_int, nargs="+", default=[1, 2, 4], help="batch sizes")
    p.add_argument("--check", action="store_true",
                   help="also verify the meta count against a real CPU run at model_channels 32, latent 16")
    p.add_argument("--out", default="results/sd_unet_memory.json", help="results JSON (+ .md beside it)")
    args = p.parse_args(argv)
    config = os.path.join(REPO_ROOT, args.config)
    if args.check:
        small = unet_config(config, model_channels=32, context_dim=64)
        for ckpt in (False, True):
            meta = saved_activation_bytes(small, 2, 16, ckpt, "meta")[1]
            real = saved_activation_bytes(small, 2, 16, ckpt, "cpu")[1]
            print(f"check (channels 32, latent 16, batch 2, grad checkpoint {ckpt}): meta {meta} B, cpu {real} B")
            if meta != real:
                raise SystemExit("the meta count differs from the real run")
    cfg = unet_config(config)
    rows = []
    for batch in args.batches:
        for ckpt in (False, True):
            n, act, attn = saved_activation_bytes(cfg, batch, args.latent, ckpt, "meta")
            weights = 4 * n
            rows.append({"batch": batch, "grad_checkpoint": ckpt, "params": n, "weights_gib": weights / GIB,
                         "saved_activations_gib": act / GIB, "attention_map_gib": attn / GIB,
                         "full_finetune_gib": (4 * weights + act + attn) / GIB,
                         "frozen_weights_gib": (weights + act + attn) / GIB})
            print(json.dumps(rows[-1]), flush=True)
    out = os.path.join(REPO_ROOT, args.out)
    command = "python benchmarks/unet_train_memory.py " + " ".join(argv or sys.argv[1:])
    atomic_write_bytes(out, json.dumps({"rows": rows, "config": args.config, "latent": args.latent, "command": command,
                                        "note": "fp32; saved activations counted on the meta device"},
                                       indent=1).encode())
    lines = ["# SD v1 UNet: training memory per step (fp32, 512x512 = latent 4x64x64)", "", f"Command: `{command}`", "",
             "Saved activations are counted on the meta device (--check: equal to a real reduced-size CPU run). "
             "\"+ weights (frozen)\" is what LoRA fine-tuning (03) needs besides the small LoRA factors and their Adam "
             "state; \"full\" adds gradients and Adam moments of every weight. Both include the largest backward "
             "transient (one attention-probability gradient).", "",
             "| batch | grad checkpoint | saved activations | + weights (frozen) | + weights, grads, Adam (full) |",
             "|---|---|---|---|---|"]
    for r in rows:
        ckpt = "yes" if r["grad_checkpoint"] else "no"
        lines.append(f"| {r['batch']} | {ckpt} | {r['saved_activations_gib']:.2f} GiB | "
                     f"{r['frozen_weights_gib']:.2f} GiB | {r['full_finetune_gib']:.2f} GiB |")
    atomic_write_bytes(out[:-5] + ".md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    cli_main(main)
