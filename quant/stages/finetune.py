"""Stage 3: quantization-aware fine-tuning of a quantized UNet against its FP teacher (MPQ-DM.md §9).

Per epoch e: B classes and x_T from a generator seeded with ``seed + e``; one S-step DDIM trajectory. Per step p
(0 = noisiest, schedule index k = S-1-p): teacher (no grad) and student see the same CFG batch [x_t; x_t],
[t; t], [uc; c]; loss = Σ(ε̃_q − ε̃_fp)² (sum) + TRD when due; backward; AdamW step; linear LR decay step. The
next latent comes from the TEACHER's ε̃ (teacher forcing), so the trajectory is independent of the student.

Because every draw derives from the epoch, a resumable checkpoint needs only the trainable tensors, the
optimizer, the scheduler and the epoch; the student's other state is rebuilt deterministically from the naive
artifact by the caller. The student resolves its step index from the timestep value (quant.step.StepTable), so
gradient checkpointing, previews and uneven call patterns are safe.
"""
import contextlib
import dataclasses
import math
import os
import warnings

import torch
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps
from ldm.util import UserError, atomic_save
from quant.artifacts import check_meta, plain
from quant.methods.trd import TRD


@dataclasses.dataclass
class FinetuneConfig:
    epochs: int = 800
    batch_size: int = 4                 # B trajectories per epoch (the UNet batch is 2B with CFG)
    ddim_steps: int = 20
    ddim_eta: float = 0.0
    guidance_scale: float = 3.0         # ignored for unconditional models
    num_classes: int = 1000             # None: unconditional model (no CFG)
    null_class: int = 1000
    seed: int = 3407                    # epoch e uses seed + e
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.01
    trd_mode: str = "paper"
    trd_window: int = 2
    trd_lambda: float = 100.0
    trd_tau: float = 1.0
    trd_cadence: str = "aligned"
    grad_checkpoint: bool = False
    nan_patience: int = 5               # abort after this many consecutive non-finite steps
    checkpoint_every: int = 10          # epochs between resumable checkpoints (0: only at the end)
    preview_every: int = 0              # epochs between preview grids (0: none)
    preview_classes: tuple = (88, 417)
    preview_seed: int = 0
    latent_shape: tuple = None          # default (model.channels, model.image_size, model.image_size)
    lora_lr_scale: float = 1.0          # multiplies the LoRA groups' lr (recorded; set via param_groups)
    teacher: str = "same"               # label of the teacher weights (recorded; a resume must agree)
    student_id: str = ""                # identity of the naive student (e.g. a hash of its artifact meta)
    progress: bool = True

    def resume_key(self) -> dict:
        """The settings a checkpoint must share with a restart (everything that changes the trajectory)."""
        skip = {"checkpoint_every", "preview_every", "preview_classes", "preview_seed", "progress", "nan_patience",
                "grad_checkpoint"}
        return {k: plain(v) for k, v in dataclasses.asdict(self).items() if k not in skip}


class FinetuneDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


# ---------------------------------------------------------------------------------------------------------------
# Model plumbing: both UNets are driven through the LDM's apply_model (so any conditioning key works).
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _unet_in(model, unet):
    holder = model.model
    saved = holder.diffusion_model
    holder.diffusion_model = unet
    try:
        yield
    finally:
        holder.diffusion_model = saved


def denoise(model, unet, x, t, cond):
    """ε from ``unet`` for a batch that shares one timestep (``t`` is an int)."""
    t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    with _unet_in(model, unet):
        return model.apply_model(x, t_batch, cond)


def guided_eps(model, unet, x, t, cond, uncond, scale):
    """CFG-combined ε̃ = ε_u + s(ε_c − ε_u) from one batched call [uncond; cond]; plain ε if uncond is None."""
    if uncond is None:
        return denoise(model, unet, x, t, cond)
    e_u, e_c = denoise(model, unet, torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
    return e_u + scale * (e_c - e_u)


@torch.no_grad()
def class_conditioning(model, labels):
    """Context for class labels through the (frozen) class embedder."""
    key = getattr(model, "cond_stage_key", None) or "class_label"
    return model.get_learned_conditioning({key: labels})


class DDIMSchedule:
    """Uniform DDIM schedule of the LDM (ascending timesteps) and the η-dependent update."""

    def __init__(self, model, steps: int, eta: float):
        self.timesteps = [int(t) for t in make_ddim_timesteps("uniform", steps, model.num_timesteps, verbose=False)]
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(model.alphas_cumprod.detach().cpu(),
                                                                    self.timesteps, eta, verbose=False)
        self.alphas = torch.as_tensor(alphas, dtype=torch.float32)
        self.alphas_prev = torch.as_tensor(alphas_prev, dtype=torch.float32)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        self.eta = float(eta)

    def __len__(self):
        return len(self.timesteps)

    def step(self, x, eps, k, generator=None):
        """x_{t_{k-1}} from x_{t_k} and ε (DDIM, Song et al. eq. 12); noise drawn from ``generator`` when η > 0."""
        a_t, a_prev, sigma = self.alphas[k].item(), self.alphas_prev[k].item(), self.sigmas[k].item()
        pred_x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        x_prev = math.sqrt(a_prev) * pred_x0 + math.sqrt(max(0.0, 1.0 - a_prev - sigma ** 2)) * eps
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x_prev = x_prev + sigma * noise
        return x_prev


def set_grad_checkpointing(unet, flag: bool):
    """Toggle the CompVis blocks' checkpoint switches (ResBlock/AttentionBlock.use_checkpoint,
    BasicTransformerBlock.checkpoint)."""
    for module in unet.modules():
        for name in ("use_checkpoint", "checkpoint"):
            if isinstance(getattr(module, name, None), bool):
                setattr(module, name, bool(flag))


def _linear_decay(total_iters):
    return lambda it: max(0.0, 1.0 - it / max(1, total_iters))


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------

def _trainable_state(unet):
    return {name: p.detach().cpu().clone() for name, p in unet.named_parameters() if p.requires_grad}


def _epoch_draws(cfg, shape, epoch, device):
    gen = torch.Generator().manual_seed(cfg.seed + epoch)
    labels = None
    if cfg.num_classes is not None:
        labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen)
    x_T = torch.randn((cfg.batch_size, *shape), generator=gen)
    return gen, (None if labels is None else labels.to(device)), x_T.to(device)


def _conditions(model, cfg, labels):
    if labels is None:
        return None, None
    cond = class_conditioning(model, labels)
    uncond = class_conditioning(model, torch.full_like(labels, cfg.null_class))
    return cond, uncond


def _grads_finite(params):
    grads = [p.grad for p in params if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def _losses(model, teacher_unet, student_unet, trd, x, t, p, cond, uncond, scale):
    """One step's forwards: (teacher ε̃, loss to backpropagate, logged output loss, logged TRD term or None)."""
    with trd.capture():
        with torch.no_grad():
            e_fp = guided_eps(model, teacher_unet, x, t, cond, uncond, scale)
        e_q = guided_eps(model, student_unet, x, t, cond, uncond, scale)
    out_loss = (e_q.float() - e_fp.float()).pow(2).sum()
    trd_loss = trd.step_loss(p)
    loss = out_loss
    if trd_loss is not None and trd_loss.requires_grad:  # paper mode; released mode is logged only
        loss = loss + trd_loss
    return e_fp, loss, out_loss.item(), None if trd_loss is None else trd_loss.item()


def _optimizer_step(optimizer, loss, params, logged):
    """Backward + AdamW step unless the loss or a gradient is non-finite (NaN guard); True if stepped."""
    optimizer.zero_grad(set_to_none=True)
    ok = math.isfinite(logged)
    if ok:
        loss.backward()
        ok = _grads_finite(params)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok


def finetune(model, student_unet, param_groups, cfg: FinetuneConfig, *, teacher_unet=None, ckpt_path=None,
             preview_dir=None, until_epoch=None, log=print):
    """Fine-tune ``student_unet`` in place; returns the per-epoch history.

    model: the FP LatentDiffusion (conditioning, schedule, decoder; its UNet is the teacher unless
    ``teacher_unet`` is given). param_groups: AdamW groups (dicts with "params", "lr") from quant's helper,
    built on the student BEFORE this call. ckpt_path: resumable checkpoint, continued when present.
    until_epoch: stop (with a checkpoint) once this many epochs are done, for time-boxed jobs.
    """
    teacher_unet = teacher_unet if teacher_unet is not None else model.model.diffusion_model
    device = next(student_unet.parameters()).device
    shape = tuple(cfg.latent_shape or (model.channels, model.image_size, model.image_size))
    schedule = DDIMSchedule(model, cfg.ddim_steps, cfg.ddim_eta)
    n_steps, total = len(schedule), cfg.epochs * len(schedule)

    groups = [dict(g) for g in param_groups]
    for g in groups:
        g.setdefault("weight_decay", cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_decay(total))

    start_epoch, history = 0, []
    if ckpt_path and os.path.isfile(ckpt_path):
        start_epoch, history = _load_checkpoint(ckpt_path, cfg, student_unet, optimizer, scheduler)
        log(f"resuming fine-tuning from {ckpt_path} at epoch {start_epoch}/{cfg.epochs}")

    trd = TRD(teacher_unet, student_unet, mode=cfg.trd_mode, window=cfg.trd_window, lam=cfg.trd_lambda,
              tau=cfg.trd_tau, cadence=cfg.trd_cadence)
    set_grad_checkpointing(student_unet, cfg.grad_checkpoint)
    teacher_unet.eval().requires_grad_(False)
    student_unet.train()
    bad_streak = 0
    bar = tqdm(total=total, initial=start_epoch * n_steps, disable=not cfg.progress, desc="fine-tune",
               dynamic_ncols=True)
    try:
        stop = cfg.epochs if until_epoch is None else max(start_epoch, min(cfg.epochs, int(until_epoch)))
        for epoch in range(start_epoch, stop):
            gen, labels, x = _epoch_draws(cfg, shape, epoch, device)
            cond, uncond = _conditions(model, cfg, labels)
            trd.reset()
            sums = {"loss": 0.0, "out": 0.0, "trd": 0.0, "trd_terms": 0, "skipped": 0}
            for p in range(n_steps):
                k = n_steps - 1 - p
                t = schedule.timesteps[k]
                e_fp, loss, out_loss, trd_loss = _losses(model, teacher_unet, student_unet, trd, x, t, p,
                                                         cond, uncond, cfg.guidance_scale)
                logged = out_loss + (0.0 if trd_loss is None else trd_loss)
                ok = _optimizer_step(optimizer, loss, params, logged)
                del loss
                if not ok:
                    bad_streak += 1
                    sums["skipped"] += 1
                    log(f"epoch {epoch} step {p}: non-finite loss or gradient ({logged}); step skipped")
                    if bad_streak >= cfg.nan_patience:
                        raise FinetuneDiverged(f"fine-tuning diverged: {bad_streak} consecutive non-finite steps "
                                               f"(epoch {epoch}, step {p}); lower the learning rates or resume "
                                               "from the last checkpoint")
                else:
                    bad_streak = 0
                    sums["loss"] += logged
                    sums["out"] += out_loss
                    if trd_loss is not None:
                        sums["trd"] += trd_loss
                        sums["trd_terms"] += 1
                with warnings.catch_warnings():  # the LR schedule advances on skipped steps too
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
                x = schedule.step(x, e_fp, k, gen).detach()  # teacher forcing
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{logged:.4g}")
            done = n_steps - sums["skipped"]
            history.append({"epoch": epoch, "loss": sums["loss"] / max(1, done), "out": sums["out"] / max(1, done),
                            "trd": sums["trd"] / max(1, sums["trd_terms"]), "lr_factor": scheduler.get_last_lr()[0]
                            / optimizer.param_groups[0]["initial_lr"],
                            "skipped": sums["skipped"]})
            last = epoch + 1 == stop
            if ckpt_path and (last or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0)):
                _save_checkpoint(ckpt_path, cfg, epoch + 1, student_unet, optimizer, scheduler, history)
            due_preview = cfg.preview_every and ((epoch + 1) % cfg.preview_every == 0 or epoch + 1 == cfg.epochs)
            if preview_dir and due_preview:
                path = os.path.join(preview_dir, f"preview_epoch{epoch + 1:05d}.png")
                write_preview(model, student_unet, cfg, schedule, path)
    finally:
        bar.close()
        trd.remove()
    student_unet.eval()
    return history


def _save_checkpoint(path, cfg, epoch, unet, optimizer, scheduler, history):
    atomic_save({"meta": {"kind": "finetune-resume", "epoch": epoch, **cfg.resume_key()},
                 "trainable": _trainable_state(unet), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "history": history}, path)


def _load_checkpoint(path, cfg, unet, optimizer, scheduler):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"The resume checkpoint {path} could not be read ({type(err).__name__}); "
                        "delete it to start over.") from None
    check_meta(state["meta"], cfg.resume_key(), what=f"resume checkpoint {path}",
               hint="restart with the arguments that made it, or delete it to start over")
    own = dict(unet.named_parameters())
    missing = [n for n, p in own.items() if p.requires_grad and n not in state["trainable"]]
    wrong = [n for n, v in state["trainable"].items() if n not in own or own[n].shape != v.shape]
    if missing or wrong:
        name = (missing or wrong)[0]
        raise UserError(f"The resume checkpoint {path} does not fit this student (tensor {name}); "
                        "delete it to start over.")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            own[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["meta"]["epoch"]), list(state["history"])


@torch.no_grad()
def trajectory_loss(model, student_unet, cfg: FinetuneConfig, epoch: int = 0, teacher_unet=None):
    """Σ over the epoch-``epoch`` teacher-forced trajectory of Σ(ε̃_q − ε̃_fp)², no training (diagnostics)."""
    teacher_unet = teacher_unet if teacher_unet is not None else model.model.diffusion_model
    device = next(student_unet.parameters()).device
    shape = tuple(cfg.latent_shape or (model.channels, model.image_size, model.image_size))
    schedule = DDIMSchedule(model, cfg.ddim_steps, cfg.ddim_eta)
    gen, labels, x = _epoch_draws(cfg, shape, epoch, device)
    cond, uncond = _conditions(model, cfg, labels)
    total = 0.0
    for k in reversed(range(len(schedule))):
        t = schedule.timesteps[k]
        e_fp = guided_eps(model, teacher_unet, x, t, cond, uncond, cfg.guidance_scale)
        e_q = guided_eps(model, student_unet, x, t, cond, uncond, cfg.guidance_scale)
        total += (e_q.float() - e_fp.float()).pow(2).sum().item()
        x = schedule.step(x, e_fp, k, gen)
    return total


# ---------------------------------------------------------------------------------------------------------------
# Previews: student-only sampling under no_grad; TRD hooks are not armed, so its buffers stay untouched.
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_latents(model, unet, cfg, schedule, labels=None, n=None, seed=0):
    """A DDIM trajectory driven by ``unet`` alone (used for previews)."""
    shape = tuple(cfg.latent_shape or (model.channels, model.image_size, model.image_size))
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n = len(labels) if labels is not None else (n or cfg.batch_size)
    x = torch.randn((n, *shape), generator=gen).to(device)
    cond = uncond = None
    if labels is not None and cfg.num_classes is not None:
        cond, uncond = _conditions(model, cfg, torch.as_tensor(labels, device=device))
    for k in reversed(range(len(schedule))):
        eps = guided_eps(model, unet, x, schedule.timesteps[k], cond, uncond, cfg.guidance_scale)
        x = schedule.step(x, eps, k, gen)
    return x


@torch.no_grad()
def write_preview(model, unet, cfg, schedule, path):
    from PIL import Image
    was_training = unet.training
    unet.eval()
    try:
        labels = list(cfg.preview_classes) if cfg.num_classes is not None else None
        z = sample_latents(model, unet, cfg, schedule, labels=labels, n=2, seed=cfg.preview_seed)
        img = model.decode_first_stage(z)
    finally:
        unet.train(was_training)
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # [n, 3, H, W]
    grid = torch.cat(list(img), dim=2).permute(1, 2, 0).numpy()          # side by side
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
