"""Stage 3: quantization-aware fine-tuning of a quantized UNet against its FP teacher (MPQ-DM.md §9).

Per epoch e: B conditions (class labels, or prompts drawn from the training prompt set, or none) and x_T from a
generator seeded with ``seed + e``; one trajectory of the model family's fine-tuning schedule
(ldm.pipelines: uniform DDIM for LDMs; the pixel family's quad/uniform sequence with ᾱ₋₁ = 1, identity steps
skipped). Per trained step p (0 = noisiest): teacher (no grad) and student see the same CFG batch [x_t; x_t],
[t; t], [uc; c] (no guidance for unconditional models); loss = Σ(ε̃_q − ε̃_fp)² (sum) + TRD when due; backward;
AdamW step; linear LR decay step. The next sample comes from the TEACHER's ε̃ (teacher forcing), so the trajectory
is independent of the student.

Because every draw derives from the epoch, a resumable checkpoint needs only the trainable tensors, the
optimizer, the scheduler and the epoch; the student's other state is rebuilt deterministically from the naive
artifact by the caller. The student resolves its step index from the timestep value (quant.step.StepTable), so
gradient checkpointing, previews and uneven call patterns are safe.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import warnings

import torch
from tqdm import tqdm

from ldm.pipelines import adapter_for
from ldm.util import UserError, atomic_save, atomic_write_bytes, write_error
from quant.artifacts import check_meta, plain
from quant.methods.trd import TRD


@dataclasses.dataclass
class FinetuneConfig:
    epochs: int = 800
    batch_size: int = 4                 # B trajectories per epoch (the UNet batch is 2B with CFG)
    ddim_steps: int = 20
    ddim_eta: float = 0.0
    guidance_scale: float = 3.0         # ignored for unconditional models
    num_classes: int = 1000             # None: not class-conditional (text: see prompts; else unconditional, no CFG)
    null_class: int = 1000
    prompts: tuple = None               # text models: the training prompts, B drawn per epoch like the classes
    skip_type: str = None               # pixel family: the sequence's spacing (quad / uniform); None for LDMs
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
        key = {k: plain(v) for k, v in dataclasses.asdict(self).items() if k not in skip}
        if self.prompts is not None:  # the set, not its text: a checkpoint names it by count and hash
            text = json.dumps(list(self.prompts)).encode("utf-8")
            key["prompts"] = {"n": len(self.prompts), "sha256": hashlib.sha256(text).hexdigest()}
        return key


class FinetuneDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients. ``checkpoint_epoch``: epochs held by the resumable
    checkpoint on disk (None when none was written or loaded), so the caller can give advice that can be followed."""

    def __init__(self, message, epoch=None, step=None, checkpoint_epoch=None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint_epoch = epoch, step, checkpoint_epoch


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


def trajectory_for(model, cfg):
    """The family's fine-tuning trajectory (ldm.pipelines.Trajectory) of the config's steps, eta and spacing."""
    return adapter_for(model).trajectory(cfg.ddim_steps, cfg.ddim_eta, cfg.skip_type)


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
    """(generator, conditions: class labels [B] on device / B prompts / None, x_T) of an epoch."""
    gen = torch.Generator().manual_seed(cfg.seed + epoch)
    items = None
    if cfg.num_classes is not None:
        items = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)
    elif cfg.prompts:
        idx = torch.randint(0, len(cfg.prompts), (cfg.batch_size,), generator=gen)
        items = [cfg.prompts[i] for i in idx.tolist()]
    x_T = torch.randn((cfg.batch_size, *shape), generator=gen)
    return gen, items, x_T.to(device)


@torch.no_grad()
def _conditions(model, cfg, items):
    """(cond, uncond) contexts: the class embedder with the null class, or the text encoder with "" ."""
    if items is None:
        return None, None
    if cfg.num_classes is not None:
        return class_conditioning(model, items), class_conditioning(model, torch.full_like(items, cfg.null_class))
    return model.get_learned_conditioning(list(items)), model.get_learned_conditioning([""] * len(items))


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
    schedule = trajectory_for(model, cfg)
    n_steps, total = len(schedule), cfg.epochs * len(schedule)

    groups = [dict(g) for g in param_groups]
    for g in groups:  # the config is the one source of the decay (it is recorded in the resume key)
        g["weight_decay"] = cfg.weight_decay
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_decay(total))

    start_epoch, history, saved_epoch = 0, [], None
    if ckpt_path and os.path.isfile(ckpt_path):
        start_epoch, history = _load_checkpoint(ckpt_path, cfg, student_unet, optimizer, scheduler)
        saved_epoch = start_epoch
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
            for p, (k, t) in enumerate(schedule.order):
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
                                               f"(epoch {epoch}, step {p})", epoch, p, saved_epoch)
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
            # the checkpoint comes first: nothing that can fail after an epoch may cost that epoch
            last = epoch + 1 == stop
            if ckpt_path and (last or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0)):
                _save_checkpoint(ckpt_path, cfg, epoch + 1, student_unet, optimizer, scheduler, history)
                saved_epoch = epoch + 1
            due_preview = cfg.preview_every and ((epoch + 1) % cfg.preview_every == 0 or epoch + 1 == cfg.epochs)
            if preview_dir and due_preview:
                path = os.path.join(preview_dir, f"preview_epoch{epoch + 1:05d}.png")
                try:
                    write_preview(model, student_unet, cfg, schedule, path)
                except OSError as err:
                    if ckpt_path and saved_epoch != epoch + 1:
                        _save_checkpoint(ckpt_path, cfg, epoch + 1, student_unet, optimizer, scheduler, history)
                    kept = f"; the checkpoint {ckpt_path} holds epoch {epoch + 1}" if ckpt_path else ""
                    raise UserError(f"{write_error(path, err)}{kept}") from None
    finally:
        bar.close()
        trd.remove()
    student_unet.eval()
    return history


def _save_checkpoint(path, cfg, epoch, unet, optimizer, scheduler, history):
    """Atomic: a failed write leaves the previous checkpoint intact (and says so)."""
    try:
        atomic_save({"meta": {"kind": "finetune-resume", "epoch": epoch, **cfg.resume_key()},
                     "trainable": _trainable_state(unet), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "history": history}, path)
    except OSError as err:
        raise UserError(f"{write_error(path, err)}; the previous checkpoint, if any, is intact") from None


def _load_checkpoint(path, cfg, unet, optimizer, scheduler):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"The resume checkpoint {path} could not be read ({type(err).__name__}); "
                        "delete it to start over.") from None
    if not (isinstance(state, dict) and isinstance(state.get("meta"), dict)
            and {"trainable", "optimizer", "scheduler", "history"} <= set(state)):
        raise UserError(f"The resume checkpoint {path} is not a fine-tuning checkpoint; delete it (or pass "
                        "--restart) to start over.")
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
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"The resume checkpoint {path} holds an optimizer state that does not fit this student "
                        f"({type(err).__name__}); delete it to start over.") from None
    return int(state["meta"]["epoch"]), list(state["history"])


@torch.no_grad()
def trajectory_loss(model, student_unet, cfg: FinetuneConfig, epoch: int = 0, teacher_unet=None):
    """Σ over the epoch-``epoch`` teacher-forced trajectory of Σ(ε̃_q − ε̃_fp)², no training (diagnostics)."""
    teacher_unet = teacher_unet if teacher_unet is not None else model.model.diffusion_model
    device = next(student_unet.parameters()).device
    shape = tuple(cfg.latent_shape or (model.channels, model.image_size, model.image_size))
    schedule = trajectory_for(model, cfg)
    gen, items, x = _epoch_draws(cfg, shape, epoch, device)
    cond, uncond = _conditions(model, cfg, items)
    total = 0.0
    for k, t in schedule.order:
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
    """A trajectory of the fine-tuning schedule driven by ``unet`` alone (used for previews); labels: class ids
    or prompts."""
    shape = tuple(cfg.latent_shape or (model.channels, model.image_size, model.image_size))
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n = len(labels) if labels is not None else (n or cfg.batch_size)
    x = torch.randn((n, *shape), generator=gen).to(device)
    cond = uncond = None
    if labels is not None and cfg.num_classes is not None:
        cond, uncond = _conditions(model, cfg, torch.as_tensor(labels, device=device))
    elif labels is not None and cfg.prompts:
        cond, uncond = _conditions(model, cfg, list(labels))
    for k, t in schedule.order:
        eps = guided_eps(model, unet, x, t, cond, uncond, cfg.guidance_scale)
        x = schedule.step(x, eps, k, gen)
    return x


@torch.no_grad()
def write_preview(model, unet, cfg, schedule, path):
    from PIL import Image
    was_training = unet.training
    unet.eval()
    try:
        labels = (list(cfg.preview_classes) if cfg.num_classes is not None
                  else list(cfg.prompts[:2]) if cfg.prompts else None)
        z = sample_latents(model, unet, cfg, schedule, labels=labels, n=2, seed=cfg.preview_seed)
        img = model.decode_first_stage(z)
    finally:
        unet.train(was_training)
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # [n, 3, H, W]
    grid = torch.cat(list(img), dim=2).permute(1, 2, 0).numpy()          # side by side
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
