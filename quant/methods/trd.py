"""TRD: time-smoothed relation distillation (MPQ-DM.md §8.2, binding).

Feature: output of the UNet's last decoder block ``output_blocks[-1]`` in teacher and student, captured by
forward hooks that are armed only around the training forwards, so preview/eval sampling and gradient-checkpoint
recomputation never write the buffers.

Window of N steps in sampling order (p = 0 is the noisiest step):
    F̄_q(p)  = (F_q(p) + Σ_{j=1..N-1} sg(F_q(p-j))) / N      (only the current step is attached)
    F̄_fp(p) = Σ_{j=0..N-1} sg(F_fp(p-j)) / N
Relation per sample n: F̂ = F̄ / ||F̄||_channels, R_n = F̂_nᵀ F̂_n (HW×HW);
    L = λ Σ_{n, rows} KL(softmax(R_fp/τ) ‖ softmax(R_q/τ))          (sum, no τ² factor)
computed in row chunks with an analytic chunked backward, so peak memory stays O(chunk · HW).

Modes: "paper" (student feature attached), "released" (both detached: the term is logged but gives no gradient,
as in the released code), "off" (no hooks, no term).
"""
import contextlib
from collections import deque

import torch
import torch.nn.functional as F

from ldm.util import UserError

TRD_MODES = ("paper", "released", "off")
TRD_CADENCES = ("aligned", "sliding")


def feature_block(unet: torch.nn.Module) -> torch.nn.Module:
    """The block whose output TRD distils: the last decoder block of the (possibly wrapped) UNet, i.e.
    ``output_blocks[-1]`` of a CompVis UNetModel, and for the DDIM paper's Model the last module of its last
    decoder level ``up[0]`` (its last attention block if that level has one, else its last ResnetBlock)."""
    for module in unet.modules():
        blocks = getattr(module, "output_blocks", None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return blocks[-1]
        levels = getattr(module, "up", None)
        if isinstance(levels, torch.nn.ModuleList) and len(levels) > 0 and hasattr(module, "conv_out"):
            level = levels[0]  # the DDIM Model stores its decoder levels reversed: up[0] runs last
            return level.attn[-1] if len(level.attn) > 0 else level.block[-1]
    raise UserError(f"TRD needs a UNet with output_blocks (CompVis) or up levels (DDIM Model), but "
                    f"{type(unet).__name__} has neither.")


def normalize_channels(feat: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, HW], unit L2 norm along C at every (sample, position)."""
    flat = feat.flatten(2)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)


def _relation_logits(hat, start: int, stop: int, inv_tau: float):
    """Rows start..stop-1 of R/τ for every sample: [N, rows, HW] from unit-norm features [N, C, HW]."""
    return torch.bmm(hat[:, :, start:stop].transpose(1, 2), hat) * inv_tau


class _RelationKL(torch.autograd.Function):
    """Σ_{n, rows} KL(softmax(R_fp/τ) ‖ softmax(R_q/τ)) with R = F̂ᵀF̂, evaluated in row chunks.

    Backward is analytic per chunk, so memory stays O(N · rows · HW) instead of autograd keeping every
    chunk's HW-wide tensors: with G = ∂L/∂R = (softmax(R_q/τ) − P_fp)/τ (row-wise, since Σ P_fp = 1) and
    R = F̂ᵀF̂, ∂L/∂F̂ = F̂ Gᵀ + F̂ G, accumulated chunk by chunk (rows I give F̂ G_Iᵀ on columns I and
    F̂_I G_I on all columns).
    """

    @staticmethod
    def forward(ctx, q_hat, fp_hat, inv_tau, rows):
        ctx.save_for_backward(q_hat, fp_hat)
        ctx.inv_tau, ctx.rows = inv_tau, rows
        total = q_hat.new_zeros(())
        for start in range(0, q_hat.shape[-1], rows):
            stop = min(q_hat.shape[-1], start + rows)
            log_p = torch.log_softmax(_relation_logits(fp_hat, start, stop, inv_tau), dim=-1)
            log_q = torch.log_softmax(_relation_logits(q_hat, start, stop, inv_tau), dim=-1)
            total += F.kl_div(log_q, log_p, reduction="sum", log_target=True)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        q_hat, fp_hat = ctx.saved_tensors
        grad = torch.zeros_like(q_hat)
        for start in range(0, q_hat.shape[-1], ctx.rows):
            stop = min(q_hat.shape[-1], start + ctx.rows)
            p = torch.softmax(_relation_logits(fp_hat, start, stop, ctx.inv_tau), dim=-1)
            g = torch.softmax(_relation_logits(q_hat, start, stop, ctx.inv_tau), dim=-1).sub_(p)
            g.mul_(grad_out * ctx.inv_tau)                                        # G_I: [N, rows, HW]
            grad[:, :, start:stop] += torch.bmm(q_hat, g.transpose(1, 2))         # F̂ G_Iᵀ -> columns I
            grad += torch.bmm(q_hat[:, :, start:stop], g)                         # F̂_I G_I -> all columns
        return grad, None, None, None


def relation_kl(feat_q: torch.Tensor, feat_fp: torch.Tensor, tau: float = 1.0, eps: float = 1e-8,
                max_chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Σ_{n, rows} KL(softmax(R_fp/τ) ‖ softmax(R_q/τ)) for window-averaged features [N, C, H, W].

    Row chunks hold at most ``max_chunk_elems`` relation entries (N × rows × HW) at a time, in forward and in
    backward; the result equals the unchunked computation. Gradient flows to ``feat_q`` only.
    """
    if feat_q.shape != feat_fp.shape:
        raise ValueError(f"TRD feature shapes differ: {tuple(feat_q.shape)} vs {tuple(feat_fp.shape)}")
    dtype = torch.float64 if feat_q.dtype == torch.float64 else torch.float32  # half features: fp32 relations
    q_hat = normalize_channels(feat_q.to(dtype), eps)
    fp_hat = normalize_channels(feat_fp.detach().to(dtype), eps)
    n, _, hw = q_hat.shape
    rows = max(1, min(hw, max_chunk_elems // max(1, n * hw)))
    return _RelationKL.apply(q_hat, fp_hat, 1.0 / tau, rows)


class TRD:
    """Hooks + per-trajectory window buffers + loss. Use: ``with trd.capture(): teacher(...); student(...)``
    then ``trd.step_loss(p)`` once per sampling step; ``trd.reset()`` at the start of every trajectory."""

    def __init__(self, teacher_unet, student_unet, mode: str = "paper", window: int = 2, lam: float = 100.0,
                 tau: float = 1.0, cadence: str = "aligned", eps: float = 1e-8, max_chunk_elems: int = 1 << 22):
        if mode not in TRD_MODES:
            raise UserError(f"TRD mode must be one of {', '.join(TRD_MODES)}, not {mode!r}.")
        if cadence not in TRD_CADENCES:
            raise UserError(f"TRD cadence must be one of {', '.join(TRD_CADENCES)}, not {cadence!r}.")
        if int(window) < 1:
            raise UserError(f"TRD window must be at least 1 step, not {window}.")
        self.mode, self.window, self.lam, self.tau = mode, int(window), float(lam), float(tau)
        self.cadence, self.eps, self.max_chunk_elems = cadence, eps, max_chunk_elems
        self._armed = False
        self._current = {"q": None, "fp": None}
        self._history = {"q": deque(maxlen=self.window - 1), "fp": deque(maxlen=self.window - 1)}
        self._handles = []
        if mode != "off":
            self._handles = [feature_block(teacher_unet).register_forward_hook(self._hook("fp")),
                             feature_block(student_unet).register_forward_hook(self._hook("q"))]

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _hook(self, side):
        def hook(_module, _inputs, output):
            if not self._armed:  # previews, evaluation, checkpoint recomputation in backward
                return
            keep_graph = side == "q" and self.mode == "paper"
            self._current[side] = output if keep_graph else output.detach().clone()
        return hook

    @contextlib.contextmanager
    def capture(self):
        """Arm the hooks for the training forwards of one step (teacher and student)."""
        self._armed = True
        try:
            yield self
        finally:
            self._armed = False

    def reset(self):
        """Start of a trajectory: windows never cross trajectories."""
        for side in ("q", "fp"):
            self._current[side] = None
            self._history[side].clear()

    def due(self, p: int) -> bool:
        """Whether step p (0 = noisiest) closes a window that gets a TRD term."""
        if not self.enabled or p < self.window - 1:
            return False
        return self.cadence == "sliding" or (p + 1) % self.window == 0

    def step_loss(self, p: int):
        """λ·Σ KL for step p if due, else None. Always moves this step's features into the (detached) history."""
        if not self.enabled:
            return None
        cur_q, cur_fp = self._current["q"], self._current["fp"]
        if cur_q is None or cur_fp is None:
            raise RuntimeError("TRD.step_loss called without teacher and student forwards under capture()")
        loss = None
        if self.due(p):
            if len(self._history["q"]) != self.window - 1:
                raise RuntimeError(f"TRD window at step {p} has {len(self._history['q'])} earlier steps; "
                                   "call reset() at the start of every trajectory and step_loss() every step")
            mean_q = (cur_q + sum(self._history["q"])) / self.window
            mean_fp = (cur_fp + sum(self._history["fp"])) / self.window
            loss = self.lam * relation_kl(mean_q, mean_fp, self.tau, self.eps, self.max_chunk_elems)
        if self.window > 1:
            self._history["q"].append(cur_q.detach())
            self._history["fp"].append(cur_fp.detach())
        self._current["q"] = self._current["fp"] = None
        return loss

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()
