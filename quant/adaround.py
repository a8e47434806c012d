"""AdaRound (Nagel et al. 2020) as a mode of a weight quantizer (PEERS.md §1.2).

While attached to a ``quant.layers.WeightQuantizer`` (``attach``), the quantizer returns the soft weight
    W̃ = Δ·(clamp(⌊W/Δ⌋ + h(V) + z, 0, L-1) - z),   h(V) = clamp(σ(V)(ζ-γ) + γ, 0, 1),  ζ = 1.1, γ = -0.1,
with V initialised so that h(V) is the fractional part of W/Δ (⌊W/Δ⌋ + h(V) = W/Δ: the inputs of nearest
rounding). ``hard`` switches to ⌊W/Δ⌋ + 1[V ≥ 0]. ``finalize`` writes the hard-rounded grid weight
(q - z)·Δ into the layer's weight and removes V: the layer is then an ordinary quantized layer whose nearest
rounding reproduces that weight bitwise, so the packed export and sampling take it unchanged.

The rounding regulariser f_reg = λ·Σ(1 - |2h(V) - 1|^β) follows ``RoundingSchedule``: zero during the first
``warmup`` fraction of the iterations (β held at β_start), then β decays linearly to β_end.
"""
from dataclasses import dataclass

import torch
from torch import nn

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v):
    """h(V) = clamp(σ(V)(ζ - γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_logits(w, delta):
    """V with h(V) = frac(W/Δ): V = -log((ζ - γ)/(frac - γ) - 1)."""
    scaled = w / delta
    frac = scaled - torch.floor(scaled)
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


class AdaRound(nn.Module):
    """The rounding logits V of one weight quantizer (same shape as the weight slice it rounds)."""

    def __init__(self, w, delta):
        super().__init__()
        self.alpha = nn.Parameter(init_logits(w.detach(), delta.detach()))
        self.soft = True

    def h(self):
        return rectified_sigmoid(self.alpha)

    def rounding(self):
        """h(V) while soft, else the hard decision 1[V ≥ 0]."""
        return self.h() if self.soft else (self.alpha >= 0).to(self.alpha.dtype)

    def forward(self, w, delta, zero, levels):
        q = torch.floor(w / delta) + self.rounding() + zero
        q = torch.minimum(q.clamp(min=0.0), levels - 1)
        return (q - zero) * delta

    def regularizer(self, beta):
        """Σ(1 - |2h(V) - 1|^β) (without λ)."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def extra_repr(self):
        return f"shape={tuple(self.alpha.shape)}, soft={self.soft}"


@dataclass(frozen=True)
class RoundingSchedule:
    """f_reg weight and β over ``n_iters`` iterations; ``count`` is the 1-based iteration number."""
    n_iters: int
    weight: float = 0.01         # λ_r
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    def active(self, count):
        return count >= self.warmup * self.n_iters

    def beta(self, count):
        start = self.warmup * self.n_iters
        if count < start:
            return self.beta_start
        rel = (count - start) / max(self.n_iters - start, 1e-12)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - rel)


def _check_plain(layer):
    if layer.lora is not None or layer.smoothing or layer.int_weight:
        raise ValueError("AdaRound needs a layer whose quantizer sees the stored weight (no LoRA, smoothing or "
                         "integer weight)")


def attach(layer):
    """Attach AdaRound to every weight quantizer of a QuantLayer (main and split half); returns the AdaRounds.
    Weight Δ/z must already be initialised."""
    _check_plain(layer)
    rounds = []
    view = layer.weight_quantizer._view
    for wq, part in layer.weight_quantizers():
        if wq.adaround is None:
            wq.adaround = AdaRound(layer.weight[:, part], wq.delta.detach().view(view))
        rounds.append(wq.adaround)
    layer.clear_cache()
    return rounds


def adarounds(layer, main_only=False):
    """The attached AdaRounds of a layer (main quantizer only with main_only)."""
    pairs = layer.weight_quantizers()[:1] if main_only else layer.weight_quantizers()
    return [wq.adaround for wq, _ in pairs if wq.adaround is not None]


@torch.no_grad()
def finalize(layer):
    """Hard-round, write the grid weight (q - z)·Δ into ``layer.weight`` and detach V. Returns the integer codes."""
    codes = []
    for wq, part in layer.weight_quantizers():
        if wq.adaround is None:
            continue
        view = wq._view
        delta, zero = wq.delta.view(view), wq.zero.view(view)
        w = layer.weight[:, part]
        q = torch.floor(w / delta) + (wq.adaround.alpha >= 0).to(w.dtype) + zero
        q = torch.minimum(q.clamp(min=0.0), wq.levels() - 1)
        layer.weight[:, part] = (q - zero) * delta
        wq.adaround = None
        codes.append(q)
    layer.clear_cache()
    if codes and not torch.equal(layer.quantized_weight(), layer.weight):
        raise RuntimeError("AdaRound finalisation: the grid weight is not reproduced by nearest rounding "
                           "(are the weight zero points integers?)")
    return codes
