#!/usr/bin/env python
"""Train the embedded digits LDM (configs/latent-diffusion/digits-ldm-vq-4.yaml) from scratch on the CPU.

Stage 1 trains the VQ-f4 autoencoder (L1 + L2 reconstruction, codebook + commitment loss; no GAN or
perceptual loss) and then reparametrises it exactly so that the latents are centred with unit standard
deviation (scale_factor stays 1.0, as in cin256-v2). Stage 2 trains the class-conditional UNet and class
embedder (eps-prediction L2, class-label dropout to the null class for classifier-free guidance, AdamW,
EMA of the weights; the EMA weights are exported). Only the digits TRAIN split is used.

Both stages write resumable checkpoints to --work_dir; rerunning the same command continues where it stopped.
The result is a CompVis-style container {"state_dict", "global_step", "epoch", ...} at --out.
"""
import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ldm.cli import ArgumentParser, nonneg_float, nonneg_int, positive_float, positive_int, probability  # noqa: E402
from ldm.util import UserError, atomic_save, cli_main, instantiate_from_config  # noqa: E402
from ldm.training import absolutize, load_state, lr_at, state_dict_sha256  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQ_ARGS = ("seed", "config", "vq_steps", "vq_batch_size", "vq_lr", "vq_ae_steps", "vq_restart_every")
LDM_ARGS = VQ_ARGS + ("ldm_steps", "ldm_batch_size", "ldm_lr", "ldm_warmup", "cond_drop", "ema_decay",
                      "weight_decay")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/latent-diffusion/digits-ldm-vq-4.yaml",
                   help="model config (LatentDiffusion with a VQModelInterface first stage and a ClassEmbedder)")
    p.add_argument("--out", default="models/ldm/digits-ldm-vq-4/model.ckpt",
                   help="where the final checkpoint is written (atomically)")
    p.add_argument("--work_dir", default="runs/train_digits/",
                   help="folder for the resumable per-stage checkpoints; rerun with the same flags to continue")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the initialisation, batches, timesteps and noise")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads; 1 by default because on a shared 2-core machine 2 OpenMP threads were "
                        "measured up to 10x slower (oversubscription); results depend on it (float summation order)")
    p.add_argument("--vq_steps", type=positive_int, default=400, help="optimizer steps of the autoencoder stage")
    p.add_argument("--vq_batch_size", type=positive_int, default=32, help="images per autoencoder step")
    p.add_argument("--vq_lr", type=positive_float, default=2e-3, help="peak Adam learning rate of the autoencoder")
    p.add_argument("--vq_ae_steps", type=nonneg_int, default=100,
                   help="first steps trained as a plain autoencoder; then the codebook is initialised from "
                        "encoder outputs and quantisation switches on")
    p.add_argument("--vq_restart_every", type=positive_int, default=50,
                   help="every this many steps, codebook entries unused since the last check are re-seeded "
                        "from encoder outputs (avoids dead codes)")
    p.add_argument("--ldm_steps", type=positive_int, default=3000, help="optimizer steps of the diffusion stage")
    p.add_argument("--ldm_batch_size", type=positive_int, default=128, help="latents per diffusion step")
    p.add_argument("--ldm_lr", type=positive_float, default=1e-3,
                   help="peak AdamW learning rate of the UNet + class embedder (cosine decay to 5%%)")
    p.add_argument("--ldm_warmup", type=nonneg_int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--cond_drop", type=probability, default=0.1,
                   help="probability that a label is replaced by the null class (classifier-free guidance)")
    p.add_argument("--ema_decay", type=probability, default=0.999, help="EMA decay of the exported weights")
    p.add_argument("--weight_decay", type=nonneg_float, default=0.01,
                   help="AdamW decoupled weight decay of the UNet + class embedder (0 turns it off)")
    p.add_argument("--ckpt_every", type=positive_int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--export_every", type=nonneg_int, default=0,
                   help="also write the EMA weights every this many diffusion steps to work_dir/model_step<N>.ckpt "
                        "(a training-length trajectory; no effect on training; 0: only the final --out)")
    p.add_argument("--eval_samples", type=nonneg_int, default=1000,
                   help="after training, sample this many images (DDIM 20, eta 0, scale 3) and print the digits "
                        "CNN's conditional accuracy; 0 skips it")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    absolutize(args, ("config", "out", "work_dir"), REPO_ROOT)
    return args


def build_config(args):
    from omegaconf import OmegaConf

    if not os.path.isfile(args.config):
        raise UserError(f"config {args.config} not found")
    return OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)["model"]


# ----------------------------------------------------------------------------------------------- stage 1: VQ
def vq_forward(vq, x, quantize):
    """(reconstruction, pre-quantisation latents h, codebook loss, indices)."""
    h = vq.encode(x)  # VQModelInterface.encode stops before the quantiser
    if not quantize:
        return vq.decoder(vq.post_quant_conv(h)), h, h.new_zeros(()), None
    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    idx = torch.argmin(vq.quantize.distances(flat), dim=1)
    e = vq.quantize.embedding(idx).view(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2)
    # standard VQ-VAE: codebook term moves codes to the encoder, beta-weighted commitment keeps h near codes
    vq_loss = F.mse_loss(e, h.detach()) + vq.quantize.beta * F.mse_loss(h, e.detach())
    z_q = h + (e - h).detach()
    return vq.decoder(vq.post_quant_conv(z_q)), h, vq_loss, idx


@torch.no_grad()
def encode_all(vq, images, batch=256):
    return torch.cat([vq.encode(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def seed_codes(vq, images, codes, gen):
    """Re-seed the given codebook rows with random encoder outputs (plus a little noise)."""
    h = encode_all(vq, images)
    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    pick = torch.randint(0, len(flat), (len(codes),), generator=gen)
    noise = 0.01 * flat.std() * torch.randn(len(codes), flat.shape[1], generator=gen)
    vq.quantize.embedding.weight[codes] = flat[pick] + noise


@torch.no_grad()
def normalise_latents(vq, images):
    """Exact reparametrisation h' = (h - m) / s (m per channel, s one scalar, so nearest codes are unchanged)."""
    h = encode_all(vq, images)
    m = h.mean(dim=(0, 2, 3))
    s = float((h - m[None, :, None, None]).std())
    vq.quant_conv.weight.div_(s)
    vq.quant_conv.bias.sub_(m).div_(s)
    emb = vq.quantize.embedding.weight
    emb.sub_(m[None]).div_(s)
    w = vq.post_quant_conv.weight  # [z_channels, embed_dim, 1, 1]
    vq.post_quant_conv.bias.add_(w[:, :, 0, 0] @ m)
    w.mul_(s)
    return m, s


def train_vq(args, model_cfg, images):
    path = os.path.join(args.work_dir, "vq.pt")
    state = load_state(path, args, VQ_ARGS)
    if state is not None and state.get("done"):
        return state
    torch.manual_seed(args.seed)
    vq = instantiate_from_config(model_cfg["params"]["first_stage_config"])
    opt = torch.optim.Adam(vq.parameters(), lr=args.vq_lr)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    used = torch.zeros(vq.quantize.n_e, dtype=torch.bool)
    if state is not None:
        vq.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed, used = state["step"], state["elapsed"], state["used"]
    from tqdm import tqdm

    bar = tqdm(total=args.vq_steps, initial=step, desc="stage 1: VQ autoencoder", disable=args.no_progress)
    t0 = time.time()

    def snapshot(done=False):
        out = {"args": {k: getattr(args, k) for k in VQ_ARGS}, "step": step, "model": vq.state_dict(),
               "opt": opt.state_dict(), "gen": gen.get_state(), "used": used, "done": done,
               "elapsed": elapsed + time.time() - t0}
        atomic_save(out, path)
        return out

    vq.train()
    while step < args.vq_steps:
        quantize = step >= args.vq_ae_steps
        if step == args.vq_ae_steps:  # codebook from the trained encoder's outputs
            seed_codes(vq, images, torch.arange(vq.quantize.n_e), gen)
            used.zero_()
        x = images[torch.randint(0, len(images), (args.vq_batch_size,), generator=gen)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vq_lr, args.vq_steps, 50)
        rec, h, vq_loss, idx = vq_forward(vq, x, quantize)
        rec_loss = (rec - x).abs().mean() + F.mse_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if idx is not None:
            used[idx] = True
            if step % args.vq_restart_every == 0 and step < args.vq_steps - args.vq_restart_every:
                dead = torch.nonzero(~used).flatten()
                if len(dead):
                    seed_codes(vq, images, dead, gen)
                used.zero_()
        bar.update(1)
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{vq_loss.item():.4f}")
        if step % args.ckpt_every == 0 and step < args.vq_steps:
            snapshot()
    bar.close()
    vq.eval()
    m, s = normalise_latents(vq, images)
    with torch.no_grad():
        h = encode_all(vq, images)
        rec = torch.cat([vq.decode(h[i:i + 256]) for i in range(0, len(h), 256)])
        codes = torch.argmin(vq.quantize.distances(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])), 1)
    stats = {"latent_mean_before": m.tolist(), "latent_std_before": s, "latent_std": float(h.std()),
             "latent_mean": h.mean(dim=(0, 2, 3)).tolist(), "train_l1": float((rec - images).abs().mean()),
             "codes_used": int(codes.unique().numel())}
    print(f"stage 1 done: {stats}", flush=True)
    state = snapshot(done=True)
    state["stats"] = stats
    atomic_save(state, path)
    return state


# ---------------------------------------------------------------------------------------------- stage 2: LDM
def train_ldm(args, model_cfg, images, labels, vq_state):
    path = os.path.join(args.work_dir, "ldm.pt")
    state = load_state(path, args, LDM_ARGS)
    torch.manual_seed(args.seed + 1)
    model = instantiate_from_config(model_cfg)
    model.first_stage_model.load_state_dict(vq_state["model"])
    with torch.no_grad():
        z = torch.cat([model.get_input_latents(images[i:i + 256]) for i in range(0, len(images), 256)])
    if not 0.5 < float(z.std()) < 2.0:
        raise RuntimeError(f"latent std {float(z.std()):.3f} is not O(1); the first stage is badly scaled")
    trainable = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    opt = torch.optim.AdamW(trainable, lr=args.ldm_lr, weight_decay=args.weight_decay)
    ema = [p.detach().clone() for p in trainable]
    gen = torch.Generator().manual_seed(args.seed + 2)
    step, elapsed = 0, 0.0
    if state is not None:
        for p, v in zip(trainable, state["params"]):
            p.data.copy_(v)
        ema = list(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed = state["step"], state["elapsed"]
    null_class = model.cond_stage_model.embedding.num_embeddings - 1
    from tqdm import tqdm

    bar = tqdm(total=args.ldm_steps, initial=step, desc="stage 2: diffusion", disable=args.no_progress)
    t0 = time.time()

    def snapshot(done=False):
        atomic_save({"args": {k: getattr(args, k) for k in LDM_ARGS}, "step": step,
                     "params": [p.detach() for p in trainable], "ema": ema, "opt": opt.state_dict(),
                     "gen": gen.get_state(), "elapsed": elapsed + time.time() - t0, "done": done}, path)

    model.train()
    while step < args.ldm_steps:
        idx = torch.randint(0, len(z), (args.ldm_batch_size,), generator=gen)
        x0, y = z[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.cond_drop] = null_class
        t = torch.randint(0, model.num_timesteps, (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.ldm_lr, args.ldm_steps, args.ldm_warmup)
        c = model.get_learned_conditioning({model.cond_stage_key: y})
        loss = F.mse_loss(model.apply_model(model.q_sample(x0, t, noise), t, c), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, trainable):
                e.lerp_(p.detach(), 1 - decay)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.ckpt_every == 0 and step < args.ldm_steps:
            snapshot()
        if args.export_every and step % args.export_every == 0 and step < args.ldm_steps:
            write_checkpoint(args, ema_state_dict(model, ema), os.path.join(args.work_dir, f"model_step{step}.ckpt"),
                             step, vq_state, elapsed + time.time() - t0, float(z.std()), len(images))
    bar.close()
    snapshot(done=True)
    elapsed += time.time() - t0
    with torch.no_grad():  # export the EMA weights as the model weights
        for p, e in zip(trainable, ema):
            p.copy_(e)
    model.eval()
    return model, elapsed, float(z.std())


def trainable_names(model):
    """State-dict names of the trained parameters, in the order train_ldm lists them."""
    return ([f"model.{n}" for n, _ in model.model.named_parameters()] +
            [f"cond_stage_model.{n}" for n, _ in model.cond_stage_model.named_parameters()])


def ema_state_dict(model, ema):
    """The model's state dict with the EMA weights in place of the trained ones (copies; training is untouched)."""
    shadow = dict(zip(trainable_names(model), ema))
    return {k: shadow.get(k, v).detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_checkpoint(args, state_dict, path, step, vq_state, ldm_elapsed, latent_std, n_train):
    """CompVis-style container {"state_dict", "global_step", "epoch", "training"} written atomically."""
    digest = state_dict_sha256(state_dict)
    ckpt = {"state_dict": state_dict, "global_step": step, "epoch": step * args.ldm_batch_size // n_train,
            "training": {"script": "scripts/train_digits_ldm.py", "data": "ldm.data.digits train split",
                         "seed": args.seed, "threads": args.threads,
                         "args": {k: getattr(args, k) for k in LDM_ARGS if k != "config"},
                         "vq_seconds": round(vq_state["elapsed"], 1), "ldm_seconds": round(ldm_elapsed, 1),
                         "latent_std": latent_std, "vq_stats": vq_state.get("stats", {}), "ema_exported": True,
                         "state_dict_sha256": digest}}
    atomic_save(ckpt, path)
    return digest


def export(args, model, vq_state, ldm_elapsed, latent_std, n_train):
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    digest = write_checkpoint(args, state_dict, args.out, args.ldm_steps, vq_state, ldm_elapsed, latent_std, n_train)
    size = os.path.getsize(args.out) / 2 ** 20
    print(f"wrote {args.out} ({size:.2f} MiB); training wall time: VQ {vq_state['elapsed']:.0f} s + "
          f"LDM {ldm_elapsed:.0f} s = {vq_state['elapsed'] + ldm_elapsed:.0f} s; state dict sha256 {digest}",
          flush=True)


def evaluate(args, model):
    from evaluation.digits_cnn import DEFAULT_DIGITS_CNN_PATH, DigitsExtractor
    from ldm.generate import generate_samples
    import numpy as np

    if not os.path.isfile(DEFAULT_DIGITS_CNN_PATH):
        print("digits CNN weights not found; skipping the accuracy check")
        return
    out = os.path.join(args.work_dir, f"eval_{args.eval_samples}.npz")
    if os.path.exists(out):
        os.remove(out)
    shutil.rmtree(out + ".shards", ignore_errors=True)
    generate_samples(model, out, n_samples=args.eval_samples, batch_size=250, ddim_steps=20, eta=0.0, scale=3.0,
                     seed=0, progress=not args.no_progress)
    with np.load(out) as data:
        images, labels = data["arr_0"], data["arr_1"]
    logits = DigitsExtractor()(images)["logits"]
    print(f"conditional accuracy (digits CNN, {len(labels)} samples, DDIM 20, eta 0, scale 3): "
          f"{float((logits.argmax(1) == labels).mean()):.4f}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ldm.data.digits import load_digits_split

    images, labels = load_digits_split("train")  # the held-out split stays unseen
    model_cfg = build_config(args)
    os.makedirs(args.work_dir, exist_ok=True)
    vq_state = train_vq(args, model_cfg, images)
    model, ldm_elapsed, latent_std = train_ldm(args, model_cfg, images, labels, vq_state)
    export(args, model, vq_state, ldm_elapsed, latent_std, len(images))
    if args.eval_samples > 0:
        evaluate(args, model)


if __name__ == "__main__":
    cli_main(main)
