"""What a reconstruction optimises: strategy objects the solver composes (it never branches on a method).

- ``Trainable`` parts give parameter groups (lr, schedule), an extra loss term and begin/end hooks:
  ``AdaRoundWeights`` (V of every weight quantizer in the unit; f_reg by a RoundingSchedule or none; hard
  rounding at the end; ``exclude`` names layers left out of both, e.g. TFMQ-DM's time-embedding linears after
  its TIB reconstruction) and ``ActivationDeltas`` (every activation Δ, split halves and matmul inputs included;
  16-bit softmax quantizers excluded).
- ``Objective`` holds the trainables, the loss (mean over batch·positions of Σ over dim 1 of |ŷ − y|^p), the input
  source of the cached batches ("quantized": the partially quantized model's inputs, the asymmetric target of the
  weight stage; "fp": the FP model's inputs) and whether activations are quantized.

A method changes what is optimised by composing new objects, not by editing the loop: EDA-DM's FBR
(quant.reconstruct.fbr) overrides ``loss`` (block + add_loss·Σ layer losses from a second forward), ``unit_inputs``
(QDrop mixing of ``batch["q"]`` and ``batch["fp"]``) and ``active`` (QDrop hooks on the quantizers) and trains
``[AdaRoundWeights(lr_w, "cosine", rounding=None), ActivationDeltas(lr_a)]``; TFMQ-DM leaves layers out via
``exclude``.
"""
import contextlib
import fnmatch

import torch

from quant import adaround
from quant.layers import QuantLayer, QuantMatMul, quant_state


def lp_loss(pred, target, p):
    """Σ over dim 1 of |ŷ − y|^p, averaged over every other dim (batch, positions); summed over tuple outputs."""
    if isinstance(pred, (tuple, list)):
        return sum(lp_loss(a, b, p) for a, b in zip(pred, target))
    return (pred - target).abs().pow(p).sum(1).mean()


def _excluded(name, patterns):
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


class Trainable:
    lr = 1e-3
    schedule = "constant"

    def applies(self, module):
        """Whether the unit has anything for this part to train (checked before any data is cached)."""
        return False

    def begin(self, module, n_iters):
        """Prepare the unit; return the parameters to optimise."""
        return []

    def penalty(self, count):
        return None

    def end(self, module):
        pass


class AdaRoundWeights(Trainable):
    """AdaRound V of the weight quantizers of the unit's layers whose policy says ``rounding="adaround"``
    (PEERS.md §1.2). rounding: a RoundingSchedule factory
    (n_iters -> schedule) for f_reg, or None (no regulariser, EDA-DM). split_reg: "main_only" (Q-Diffusion:
    only the main quantizer is regularised) or "channel_share" (TFMQ-DM: each half weighted by its channel share)."""

    def __init__(self, lr=1e-3, schedule="constant", rounding=adaround.RoundingSchedule, exclude=(),
                 split_reg="main_only"):
        if split_reg not in ("main_only", "channel_share"):
            raise ValueError(f"unknown split regulariser weighting {split_reg!r}")
        self.lr, self.schedule, self.rounding, self.exclude, self.split_reg = lr, schedule, rounding, exclude, split_reg
        self._layers, self._terms, self._sched = [], [], None

    def _layers_of(self, module):
        return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantLayer)
                and m.spec.rounding == "adaround" and not _excluded(n, self.exclude)]

    def applies(self, module):
        return bool(self._layers_of(module))

    def begin(self, module, n_iters):
        self._layers, self._terms = [], []
        self._sched = None if self.rounding is None else self.rounding(n_iters)
        params = []
        for _, layer in self._layers_of(module):
            rounds = adaround.attach(layer)
            self._layers.append(layer)
            params += [r.alpha for r in rounds]
            cin = layer.weight.shape[1]
            if len(rounds) == 1:
                self._terms.append((rounds[0], 1.0))
            elif self.split_reg == "main_only":
                self._terms.append((rounds[0], 1.0))
            else:
                self._terms += [(rounds[0], layer.split / cin), (rounds[1], (cin - layer.split) / cin)]
        return params

    def penalty(self, count):
        if self._sched is None or not self._sched.active(count):
            return None
        beta = self._sched.beta(count)
        return self._sched.weight * sum(w * r.regularizer(beta) for r, w in self._terms)

    def end(self, module):
        for layer in self._layers:
            adaround.finalize(layer)
        self._layers, self._terms = [], []


def act_quantizers(module, max_bits=15):
    """Activation quantizers of a unit (layer inputs incl. split halves, matmul inputs) up to ``max_bits``."""
    out = []
    for m in module.modules():
        if isinstance(m, (QuantLayer, QuantMatMul)):
            out += [q for q in m.act_quantizers() if q.n_bits <= max_bits]
    return out


class ActivationDeltas(Trainable):
    """Every activation Δ in the unit (LSQ-style through the fake quantizer's STE gradient); z stays fixed."""

    def __init__(self, lr=4e-4, schedule="cosine", max_bits=15):
        self.lr, self.schedule, self.max_bits = lr, schedule, max_bits

    def applies(self, module):
        return bool(act_quantizers(module, self.max_bits))

    def begin(self, module, n_iters):
        return [q.delta for q in act_quantizers(module, self.max_bits)]


class Objective:
    """trainables + loss + input source; see the module docstring."""

    def __init__(self, trainables, p=2.0, input_source="quantized", act_quant=False, inputs_act_quant=False):
        if input_source not in ("quantized", "fp"):
            raise ValueError(f"unknown input source {input_source!r}")
        self.trainables, self.p = list(trainables), float(p)
        self.input_source, self.act_quant, self.inputs_act_quant = input_source, act_quant, inputs_act_quant
        self._grad_flags = []

    @property
    def needs(self):
        """Which cached inputs the batches must carry: {"q"} and/or {"fp"} (the target is always there)."""
        return {"q"} if self.input_source == "quantized" else {"fp"}

    def applies(self, module):
        return any(t.applies(module) for t in self.trainables)

    def begin(self, module, n_iters):
        self._grad_flags = [(p, p.requires_grad) for p in module.parameters()]
        module.requires_grad_(False)
        groups = []
        for t in self.trainables:
            params = t.begin(module, n_iters)
            for p in params:
                p.requires_grad_(True)
            if params:
                groups.append({"params": params, "lr": t.lr, "schedule": t.schedule})
        return groups

    @contextlib.contextmanager
    def active(self, module, fp_module):
        with quant_state(module, act=self.act_quant):
            yield

    def unit_inputs(self, batch, generator):
        return batch["q"] if self.input_source == "quantized" else batch["fp"]

    def loss(self, ctx):
        rec = lp_loss(ctx.output, ctx.batch["target"], self.p)
        extra = [t.penalty(ctx.count) for t in self.trainables]
        extra = [e for e in extra if e is not None]
        return rec, (sum(extra) if extra else torch.zeros((), device=rec.device))

    def end(self, module):
        for t in self.trainables:
            t.end(module)
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self._grad_flags = []
