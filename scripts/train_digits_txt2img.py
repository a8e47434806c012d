#!/usr/bin/env python
"""Train the embedded text-to-image digits model (configs/stable-diffusion/digits-txt2img.yaml) on the CPU.

Stage 0 builds the CLIP BPE tokenizer offline from the digits phrasings (ldm.data.prompts) into the folder the
config names (cond_stage_config.params.version); an existing folder must match the rebuild byte for byte.
Stage 1 trains the KL-f4 autoencoder (L1 + L2 reconstruction of posterior samples + a small KL term; no GAN or
perceptual loss) and reparametrises it exactly so that the posterior means are centred per channel and
`scale_factor` (0.18215, as SD) times them has unit standard deviation.
Stage 2 pretrains the CLIP text encoder (seeded at random) in place of CLIP's own pretraining: a linear probe on
its mean last hidden state must name the digit of each training phrasing ("" is an 11th class), which spreads
the prompt's meaning over the 77 positions SD's cross-attention reads. Without it the random encoder keeps the
digit in one token of 77, and the UNet had not used it (prompt accuracy at chance) after 750 diffusion steps with
the encoder frozen, nor after 500 with it trained jointly. The probe is discarded; the encoder stays frozen, as in SD.
Stage 3 trains the UNet (eps-prediction L2, AdamW, cosine schedule, EMA exported) on the posterior means of the
digits TRAIN split, each image captioned by a random training phrasing of its digit, replaced by "" with
probability --cond_drop (classifier-free guidance); the 77x64 contexts of the 81 prompts are computed once.
The text encoder ships in the checkpoint under cond_stage_model.transformer.*, like SD's.

The training stages write resumable checkpoints to --work_dir; rerunning the same command continues where it
stopped and reproduces the weights bit for bit (same --threads, same machine type). The result is a CompVis
container {"state_dict", "global_step", "epoch", "training"} at --out, loadable by ldm.util.load_model_from_config.
"""
import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ldm.cli import ArgumentParser, nonneg_float, nonneg_int, positive_float, positive_int, probability  # noqa: E402
from ldm.util import UserError, atomic_save, cli_main, instantiate_from_config  # noqa: E402
from ldm.training import absolutize, load_state, lr_at, state_dict_sha256  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AE_ARGS = ("seed", "config", "ae_steps", "ae_batch_size", "ae_lr", "kl_weight")
TEXT_ARGS = ("seed", "config", "text_steps", "text_lr")
LDM_ARGS = AE_ARGS + TEXT_ARGS[2:] + ("ldm_steps", "ldm_batch_size", "ldm_lr", "ldm_warmup", "cond_drop", "ema_decay",
                      "weight_decay")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/stable-diffusion/digits-txt2img.yaml",
                   help="model config (LatentDiffusion, AutoencoderKL first stage, FrozenCLIPEmbedder text encoder)")
    p.add_argument("--out", default="models/ldm/digits-txt2img/model.ckpt",
                   help="where the final checkpoint is written (atomically)")
    p.add_argument("--work_dir", default="runs/train_digits_txt2img/",
                   help="folder for the resumable per-stage checkpoints; rerun with the same flags to continue")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the initialisation (text encoder included), batches, prompts, timesteps and noise")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads; 1 by default (a shared 2-core machine is oversubscribed by more); "
                        "results depend on it (float summation order)")
    p.add_argument("--ae_steps", type=positive_int, default=400, help="optimizer steps of the autoencoder stage")
    p.add_argument("--ae_batch_size", type=positive_int, default=32, help="images per autoencoder step")
    p.add_argument("--ae_lr", type=positive_float, default=2e-3, help="peak Adam learning rate of the autoencoder")
    p.add_argument("--kl_weight", type=nonneg_float, default=1e-4,
                   help="weight of the per-element KL(posterior || N(0, I)) against the per-pixel reconstruction "
                        "loss (keeps the posterior variance finite; small, as SD's 1e-6 on summed terms)")
    p.add_argument("--text_steps", type=positive_int, default=200,
                   help="full-batch Adam steps of the text-encoder pretraining (digit probe)")
    p.add_argument("--text_lr", type=positive_float, default=1e-3, help="Adam learning rate of the text pretraining")
    p.add_argument("--ldm_steps", type=positive_int, default=2000, help="optimizer steps of the diffusion stage")
    p.add_argument("--ldm_batch_size", type=positive_int, default=64, help="latents per diffusion step")
    p.add_argument("--ldm_lr", type=positive_float, default=1e-3,
                   help="peak AdamW learning rate of the UNet (cosine decay to 5%%)")
    p.add_argument("--ldm_warmup", type=nonneg_int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--cond_drop", type=probability, default=0.1,
                   help='probability that a caption is replaced by "" (classifier-free guidance)')
    p.add_argument("--ema_decay", type=probability, default=0.999, help="EMA decay of the exported weights")
    p.add_argument("--weight_decay", type=nonneg_float, default=0.01,
                   help="AdamW decoupled weight decay of the UNet")
    p.add_argument("--ckpt_every", type=positive_int, default=250, help="steps between resumable checkpoints")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    absolutize(args, ("config", "out", "work_dir"), REPO_ROOT)
    return args


def build_config(args):
    from omegaconf import OmegaConf

    if not os.path.isfile(args.config):
        raise UserError(f"config {args.config} not found; pass --config with the digits-txt2img YAML")
    return OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)["model"]


# ------------------------------------------------------------------------------------------ stage 0: tokenizer
def tokenizer_corpus():
    from ldm.data.prompts import digits_prompt_list

    return digits_prompt_list(heldout=False) + digits_prompt_list(heldout=True)


def build_tokenizer(model_cfg):
    """Write (or verify) the tokenizer folder the config names; check the config's vocabulary ids against it."""
    from ldm.modules.encoders.clip_bpe import BOS, EOS, write_clip_tokenizer

    params = model_cfg["params"]["cond_stage_config"]["params"]
    folder = params["version"] if os.path.isabs(params["version"]) else os.path.join(REPO_ROOT, params["version"])
    with tempfile.TemporaryDirectory() as tmp:
        size = write_clip_tokenizer(tmp, tokenizer_corpus())
        fresh = {name: open(os.path.join(tmp, name), "rb").read() for name in sorted(os.listdir(tmp))}
    if os.path.isdir(folder):
        stale = [n for n, data in fresh.items()
                 if not os.path.isfile(os.path.join(folder, n)) or open(os.path.join(folder, n), "rb").read() != data]
        if stale:
            raise UserError(f"the tokenizer in {folder} differs from the one the digits phrasings build "
                            f"({', '.join(stale)}); delete the folder to rebuild it (and retrain the model)")
    else:
        write_clip_tokenizer(folder, tokenizer_corpus())
    text = params["text_config"]
    expected = {"vocab_size": size, "bos_token_id": size - 2, "eos_token_id": size - 1, "pad_token_id": size - 1}
    wrong = {k: v for k, v in expected.items() if text.get(k) != v}
    if wrong:
        raise UserError(f"{', '.join(f'{k} {text.get(k)}' for k in wrong)} in the config's text_config do not match "
                        f"the tokenizer ({wrong}); set them in the config")
    print(f"stage 0: tokenizer {folder} ({size} tokens; {BOS} {size - 2}, {EOS} {size - 1})", flush=True)


# ------------------------------------------------------------------------------------- stage 1: autoencoder
@torch.no_grad()
def encode_means(ae, images, batch=256):
    return torch.cat([ae.encode(images[i:i + batch]).mean for i in range(0, len(images), batch)])


@torch.no_grad()
def normalise_latents(ae, images, scale_factor):
    """Exact reparametrisation z' = (z - m) * a with a = 1 / (scale_factor * s): centred posterior means whose
    scaled version has unit std (m per channel, s one scalar); the decoder absorbs the inverse map."""
    z = encode_means(ae, images)
    m = z.mean(dim=(0, 2, 3))
    s = float((z - m[None, :, None, None]).std())
    a = 1.0 / (scale_factor * s)
    k = m.numel()
    w, b = ae.quant_conv.weight, ae.quant_conv.bias  # rows [:k] the means, [k:] the log-variances
    w[:k].mul_(a)
    b[:k].sub_(m).mul_(a)
    b[k:].add_(2.0 * math.log(a))
    pw = ae.post_quant_conv.weight  # [z_channels, embed_dim, 1, 1]: decode(z) = W (z'/a + m) + b
    ae.post_quant_conv.bias.add_(pw[:, :, 0, 0] @ m)
    pw.div_(a)
    return m, s


def train_autoencoder(args, model_cfg, images):
    path = os.path.join(args.work_dir, "autoencoder.pt")
    state = load_state(path, args, AE_ARGS)
    if state is not None and state.get("done"):
        return state
    torch.manual_seed(args.seed)
    ae = instantiate_from_config(model_cfg["params"]["first_stage_config"])
    opt = torch.optim.Adam(ae.parameters(), lr=args.ae_lr)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    if state is not None:
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed = state["step"], state["elapsed"]
    from tqdm import tqdm

    bar = tqdm(total=args.ae_steps, initial=step, desc="stage 1: KL autoencoder", disable=args.no_progress)
    t0 = time.time()

    def snapshot(done=False, stats=None):
        out = {"args": {k: getattr(args, k) for k in AE_ARGS}, "step": step, "model": ae.state_dict(),
               "opt": opt.state_dict(), "gen": gen.get_state(), "done": done,
               "elapsed": elapsed + time.time() - t0, "stats": stats or {}}
        atomic_save(out, path)
        return out

    ae.train()
    while step < args.ae_steps:
        x = images[torch.randint(0, len(images), (args.ae_batch_size,), generator=gen)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.ae_lr, args.ae_steps, 50)
        posterior = ae.encode(x)
        rec = ae.decode(posterior.sample(generator=gen))
        rec_loss = (rec - x).abs().mean() + F.mse_loss(rec, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec_loss + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.2f}")
        if step % args.ckpt_every == 0 and step < args.ae_steps:
            snapshot()
    bar.close()
    ae.eval()
    scale_factor = float(model_cfg["params"]["scale_factor"])
    m, s = normalise_latents(ae, images, scale_factor)
    with torch.no_grad():
        z = encode_means(ae, images)
        rec = torch.cat([ae.decode(z[i:i + 256]) for i in range(0, len(z), 256)])
        post_std = torch.cat([ae.encode(images[i:i + 256]).std for i in range(0, len(images), 256)])
    stats = {"latent_mean_before": m.tolist(), "latent_std_before": s,
             "scaled_latent_std": float(z.std()) * scale_factor,
             "train_l1": float((rec - images).abs().mean()),
             "scaled_posterior_std_mean": float(post_std.mean()) * scale_factor}  # noise of a posterior sample
    print(f"stage 1 done: {stats}", flush=True)
    return snapshot(done=True, stats=stats)


# ------------------------------------------------------------------------------------ stage 2: text encoder
def captions():
    """(the training prompts digit-major + "" last, their class: the digit, 10 for "")."""
    from ldm.data.prompts import digit_prompts

    prompts = [p for d in range(10) for p in digit_prompts(d)] + [""]
    classes = [d for d in range(10) for _ in digit_prompts(d)] + [10]
    return prompts, torch.tensor(classes)


def train_text_encoder(args, model_cfg):
    """Pretrain the text encoder against a digit probe on its mean hidden state; returns the stage state."""
    from ldm.data.prompts import digit_prompts

    path = os.path.join(args.work_dir, "text_encoder.pt")
    state = load_state(path, args, TEXT_ARGS)
    if state is not None and state.get("done"):
        return state
    torch.manual_seed(args.seed + 3)
    encoder = instantiate_from_config(model_cfg["params"]["cond_stage_config"])
    encoder.transformer.requires_grad_(True)  # FrozenCLIPEmbedder freezes itself; it stays in eval mode
    probe = torch.nn.Linear(encoder.transformer.text_model.config.hidden_size, 11)
    prompts, classes = captions()
    tokens = encoder.tokenize(prompts)
    params = list(encoder.transformer.parameters()) + list(probe.parameters())
    opt = torch.optim.Adam(params, lr=args.text_lr)
    t0 = time.time()
    from tqdm import tqdm

    for step in tqdm(range(args.text_steps), desc="stage 2: text encoder", disable=args.no_progress):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.text_lr, args.text_steps, 20)
        loss = F.cross_entropy(probe(encoder(tokens).mean(dim=1)), classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        heldout = [p for d in range(10) for p in digit_prompts(d, heldout=True)]
        pred = probe(encoder(heldout).mean(dim=1)).argmax(1)
        truth = torch.tensor([d for d in range(10) for _ in digit_prompts(d, heldout=True)])
        contexts = encoder(prompts)
    stats = {"final_loss": loss.item(), "heldout_probe_accuracy": float((pred == truth).float().mean()),
             "context_change_between_digits": float((contexts[:-1:8][1:] - contexts[:-1:8][:-1]).abs().mean())}
    print(f"stage 2 done: {stats}", flush=True)
    state = {"args": {k: getattr(args, k) for k in TEXT_ARGS}, "model": encoder.transformer.state_dict(),
             "done": True, "elapsed": time.time() - t0, "stats": stats}
    atomic_save(state, path)
    return state


# --------------------------------------------------------------------------------------- stage 3: diffusion
def disable_attention_recompute(model):
    """CompVis' BasicTransformerBlock always checkpoints (recomputes) in training whatever use_checkpoint says;
    at 8x8 latents memory is no concern, so training skips the recomputation (a module flag, no weights)."""
    from ldm.modules.attention import BasicTransformerBlock

    for module in model.modules():
        if isinstance(module, BasicTransformerBlock):
            module.checkpoint = False


def train_ldm(args, model_cfg, images, labels, ae_state, text_state):
    path = os.path.join(args.work_dir, "ldm.pt")
    state = load_state(path, args, LDM_ARGS)
    torch.manual_seed(args.seed + 1)  # UNet initialisation
    model = instantiate_from_config(model_cfg)
    model.first_stage_model.load_state_dict(ae_state["model"])
    model.cond_stage_model.transformer.load_state_dict(text_state["model"])
    disable_attention_recompute(model)
    with torch.no_grad():
        z = model.scale_factor * encode_means(model.first_stage_model, images)
        prompts, classes = captions()
        contexts = model.get_learned_conditioning(prompts)  # frozen encoder: every context once
    if not 0.5 < float(z.std()) < 2.0:
        raise RuntimeError(f"scaled latent std {float(z.std()):.3f} is not O(1); the first stage is badly scaled")
    per_digit = torch.stack([torch.nonzero(classes == d).flatten() for d in range(10)])  # [10, phrasings]
    null_prompt = len(prompts) - 1
    trainable = list(model.model.parameters())
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
    from tqdm import tqdm

    bar = tqdm(total=args.ldm_steps, initial=step, desc="stage 3: diffusion", disable=args.no_progress)
    t0 = time.time()

    def snapshot(done=False):
        atomic_save({"args": {k: getattr(args, k) for k in LDM_ARGS}, "step": step,
                     "params": [p.detach() for p in trainable], "ema": ema, "opt": opt.state_dict(),
                     "gen": gen.get_state(), "elapsed": elapsed + time.time() - t0, "done": done}, path)

    model.train()
    k = per_digit.shape[1]
    while step < args.ldm_steps:
        idx = torch.randint(0, len(z), (args.ldm_batch_size,), generator=gen)
        pick = per_digit[labels[idx], torch.randint(0, k, (len(idx),), generator=gen)]
        pick[torch.rand(len(idx), generator=gen) < args.cond_drop] = null_prompt
        t = torch.randint(0, model.num_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(z[idx].shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.ldm_lr, args.ldm_steps, args.ldm_warmup)
        loss = F.mse_loss(model.apply_model(model.q_sample(z[idx], t, noise), t, contexts[pick]), noise)
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
    bar.close()
    snapshot(done=True)
    elapsed += time.time() - t0
    with torch.no_grad():  # export the EMA weights as the model weights
        for p, e in zip(trainable, ema):
            p.copy_(e)
    model.eval()
    return model, elapsed


def export(args, model, ae_state, text_state, ldm_elapsed, n_train):
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    digest = state_dict_sha256(state_dict)
    ckpt = {"state_dict": state_dict, "global_step": args.ldm_steps,
            "epoch": args.ldm_steps * args.ldm_batch_size // n_train,
            "training": {"script": "scripts/train_digits_txt2img.py", "data": "ldm.data.digits train split",
                         "captions": "ldm.data.prompts.TRAIN_PHRASINGS (uniform per image), '' with cond_drop",
                         "text_encoder": "seeded random init, pretrained by a digit probe (stage 2), frozen",
                         "seed": args.seed, "threads": args.threads,
                         "args": {k: getattr(args, k) for k in LDM_ARGS if k != "config"},
                         "ae_seconds": round(ae_state["elapsed"], 1),
                         "text_seconds": round(text_state["elapsed"], 1), "ldm_seconds": round(ldm_elapsed, 1),
                         "ae_stats": ae_state.get("stats", {}), "text_stats": text_state.get("stats", {}),
                         "ema_exported": True,
                         "state_dict_sha256": digest}}
    atomic_save(ckpt, args.out)
    size = os.path.getsize(args.out) / 2 ** 20
    total = ae_state["elapsed"] + text_state["elapsed"] + ldm_elapsed
    print(f"wrote {args.out} ({size:.2f} MiB); training wall time: autoencoder {ae_state['elapsed']:.0f} s + text "
          f"encoder {text_state['elapsed']:.0f} s + diffusion {ldm_elapsed:.0f} s = {total:.0f} s; state dict sha256 "
          f"{digest}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ldm.data.digits import load_digits_split

    images, labels = load_digits_split("train")  # the held-out split stays unseen
    model_cfg = build_config(args)
    build_tokenizer(model_cfg)
    os.makedirs(args.work_dir, exist_ok=True)
    ae_state = train_autoencoder(args, model_cfg, images)
    text_state = train_text_encoder(args, model_cfg)
    model, ldm_elapsed = train_ldm(args, model_cfg, images, labels, ae_state, text_state)
    export(args, model, ae_state, text_state, ldm_elapsed, len(images))


if __name__ == "__main__":
    cli_main(main)
