"""Activation quantizers: per tensor (MPQ-DM.md §3.1-3.2, PEERS.md §1.1).

``TemporalActQuantizer`` holds one (Δ, z) per sampling step with shapes fixed at construction, so a state
dict loads into a freshly wrapped model without a forward. While ``shared`` is set (the naive stage: one
calibrated scalar copied into every entry) it works without a step index; once fine-tuning makes the entries
diverge (``shared`` cleared) a step index from ``quant.step.step_scope`` is required.

Options fixed at construction (they come from the layer policy, so ``build_from_meta`` re-creates them):
``symmetric`` (signed grid, z fixed at 2^(b-1); see quant.quantizer) and ``scale_method`` ("mse" | "max" | "search") of
``calibrate``. ``SoftmaxQuantizer`` is the unsigned attention-probability quantizer: z = 0, Δ = max/(2^b - 1),
up to 16 bits; ``TemporalSoftmaxQuantizer`` is its per-step form (TFMQ-DM's released FSC, up to 8 bits).
``set_range(lo, hi)`` sets (Δ, z) from a tracked range (running statistics).
"""
import torch
from torch import nn

from quant.quantizer import fake_quant, init_max, init_mse, init_search, range_qparams
from quant.step import current_step

SCALE_METHODS = ("mse", "max", "search")  # search: EDA-DM's range search (quant.quantizer.search_range)


def _check_bits(n_bits, high=8):
    if not 2 <= int(n_bits) <= high:
        raise ValueError(f"activation bits must be in 2..{high}, got {n_bits}")


def _init(x, n_bits, symmetric, scale_method):
    if scale_method not in SCALE_METHODS:
        raise ValueError(f"unknown scale method {scale_method!r}")
    if scale_method == "search":       # an affine grid on a searched range (symmetric changes nothing here)
        return init_search(x, n_bits)
    return (init_mse if scale_method == "mse" else init_max)(x, n_bits, symmetric=symmetric)


class ActQuantizer(nn.Module):
    """Single per-tensor scale (the W8A8 special layers, one-set activation quantizers, attention matmul inputs)."""

    max_bits = 8

    def __init__(self, n_bits=8, symmetric=False, scale_method="mse"):
        super().__init__()
        _check_bits(n_bits, self.max_bits)
        self.n_bits = int(n_bits)
        self.symmetric = bool(symmetric)
        self.scale_method = scale_method
        self.delta = nn.Parameter(torch.ones(()))
        self.zero = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def calibrate(self, x):
        delta, zero = _init(x, self.n_bits, self.symmetric, self.scale_method)
        self.delta.copy_(delta)
        self.zero.copy_(zero)

    @torch.no_grad()
    def set_range(self, lo, hi):
        delta, zero = range_qparams(lo, hi, self.n_bits, symmetric=self.symmetric)
        self.delta.copy_(delta)
        self.zero.copy_(zero)

    def forward(self, x):
        return fake_quant(x, self.delta, self.zero, 2 ** self.n_bits)

    def extra_repr(self):
        return f"bits={self.n_bits}" + (", symmetric" if self.symmetric else "")


class SoftmaxQuantizer(ActQuantizer):
    """Unsigned quantizer of attention probabilities (PEERS.md §1.1): z = 0, Δ = max/(2^b - 1), 2..16 bits."""

    max_bits = 16

    def __init__(self, n_bits=8):
        super().__init__(n_bits, symmetric=False, scale_method="max")

    @torch.no_grad()
    def calibrate(self, x):
        self.set_range(0.0, x.detach().max())

    @torch.no_grad()
    def set_range(self, lo, hi):
        delta, zero = range_qparams(0.0, hi, self.n_bits, unsigned=True)
        self.delta.copy_(delta)
        self.zero.copy_(zero)

    def extra_repr(self):
        return f"bits={self.n_bits}, unsigned"


class TemporalActQuantizer(nn.Module):
    """Per-step (Δ[k], z[k]) for k = 0..S-1, k read from the ambient step index."""

    def __init__(self, n_bits, n_steps, symmetric=False, scale_method="mse"):
        super().__init__()
        _check_bits(n_bits)
        if n_steps < 1:
            raise ValueError("a temporal quantizer needs at least one step")
        self.n_bits = int(n_bits)
        self.symmetric = bool(symmetric)
        self.scale_method = scale_method
        self.delta = nn.Parameter(torch.ones(n_steps))
        self.zero = nn.Parameter(torch.zeros(n_steps))
        # True while every entry holds the same calibrated value (naive stage); persistent so loading restores it.
        self.register_buffer("shared", torch.tensor(True))

    @property
    def n_steps(self):
        return self.delta.numel()

    @torch.no_grad()
    def calibrate(self, x):
        """Naive-stage init: one scalar (mse by default) on x, copied into all S entries."""
        delta, zero = _init(x, self.n_bits, self.symmetric, self.scale_method)
        self.delta.fill_(delta.item())
        self.zero.fill_(zero.item())
        self.shared.fill_(True)

    def _range_qparams(self, lo, hi):
        return range_qparams(lo, hi, self.n_bits, symmetric=self.symmetric)

    @torch.no_grad()
    def set_range(self, lo, hi, k=None):
        """(Δ, z) from a tracked range, into entry k (all entries, shared, when k is None)."""
        delta, zero = self._range_qparams(lo, hi)
        if k is None:
            self.delta.fill_(delta.item())
            self.zero.fill_(zero.item())
            self.shared.fill_(True)
        else:
            self.delta[k] = delta
            self.zero[k] = zero

    def make_temporal(self):
        """Declare that entries may differ from now on (fine-tuning): a step index becomes mandatory."""
        self.shared.fill_(False)

    def forward(self, x):
        k = current_step()
        if k is None:
            if not bool(self.shared):
                raise RuntimeError("temporal activation quantizer called without a step index; "
                                   "call the model through QuantUNet or inside quant.step.step_scope(k)")
            k = 0
        return fake_quant(x, self.delta[k], self.zero[k], 2 ** self.n_bits)

    def extra_repr(self):
        return f"bits={self.n_bits}, steps={self.n_steps}" + (", symmetric" if self.symmetric else "")


class TemporalSoftmaxQuantizer(TemporalActQuantizer):
    """Per-step unsigned attention-probability quantizer (TFMQ-DM's released FSC gives every activation quantizer,
    the softmax's included, one set per step): entry k has z = 0, Δ = max/(2^b - 1)."""

    def __init__(self, n_bits, n_steps):
        super().__init__(n_bits, n_steps, symmetric=False, scale_method="max")

    @torch.no_grad()
    def calibrate(self, x):
        self.set_range(0.0, x.detach().max())

    def _range_qparams(self, lo, hi):
        return range_qparams(0.0, hi, self.n_bits, unsigned=True)

    def extra_repr(self):
        return f"bits={self.n_bits}, steps={self.n_steps}, unsigned"
