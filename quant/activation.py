"""Activation quantizers: per tensor, asymmetric (MPQ-DM.md §3.1-3.2).

``TemporalActQuantizer`` holds one (Δ, z) per sampling step with shapes fixed at construction, so a state
dict loads into a freshly wrapped model without a forward. While ``shared`` is set (the naive stage: one
calibrated scalar copied into every entry) it works without a step index; once fine-tuning makes the entries
diverge (``shared`` cleared) a step index from ``quant.step.step_scope`` is required.
"""
import torch
from torch import nn

from quant.quantizer import fake_quant, init_mse
from quant.step import current_step


def _check_bits(n_bits):
    if not 2 <= int(n_bits) <= 8:
        raise ValueError(f"activation bits must be in 2..8, got {n_bits}")


class ActQuantizer(nn.Module):
    """Single per-tensor scale (the W8A8 special layers, attention matmul inputs when not temporal)."""

    def __init__(self, n_bits=8):
        super().__init__()
        _check_bits(n_bits)
        self.n_bits = int(n_bits)
        self.delta = nn.Parameter(torch.ones(()))
        self.zero = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def calibrate(self, x):
        delta, zero = init_mse(x, self.n_bits)
        self.delta.copy_(delta)
        self.zero.copy_(zero)

    def forward(self, x):
        return fake_quant(x, self.delta, self.zero, 2 ** self.n_bits)

    def extra_repr(self):
        return f"bits={self.n_bits}"


class TemporalActQuantizer(nn.Module):
    """Per-step (Δ[k], z[k]) for k = 0..S-1, k read from the ambient step index."""

    def __init__(self, n_bits, n_steps):
        super().__init__()
        _check_bits(n_bits)
        if n_steps < 1:
            raise ValueError("a temporal quantizer needs at least one step")
        self.n_bits = int(n_bits)
        self.delta = nn.Parameter(torch.ones(n_steps))
        self.zero = nn.Parameter(torch.zeros(n_steps))
        # True while every entry holds the same calibrated value (naive stage); persistent so loading restores it.
        self.register_buffer("shared", torch.tensor(True))

    @property
    def n_steps(self):
        return self.delta.numel()

    @torch.no_grad()
    def calibrate(self, x):
        """Naive-stage init: one mse scalar on x, copied into all S entries."""
        delta, zero = init_mse(x, self.n_bits)
        self.delta.fill_(delta.item())
        self.zero.fill_(zero.item())
        self.shared.fill_(True)

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
        return f"bits={self.n_bits}, steps={self.n_steps}"
