"""LoRA factors added to the weight before quantization (MPQ-DM.md §4): ΔW from A and B, rank r, scale 1.

A is Kaiming-uniform (a = √5, PyTorch's default layer init, fan-in from A's own shape); B is zero, so ΔW = 0
at the start. A is drawn on the generator's device (the CPU for the usual CPU generator) and then copied to the
weight's device: a CPU generator cannot fill a CUDA tensor, and this way the init is identical on every device.
Each ΔW is one einsum, never a loop over kernel positions or an identity matrix.
"""
import math

import torch
from torch import nn


def kaiming_uniform_draw(shape, generator=None):
    """Kaiming-uniform (a = √5) values of ``shape`` drawn on the generator's device (CPU without a generator)."""
    out = torch.empty(shape, device=generator.device if generator is not None else "cpu")
    return nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)


class LoRA(nn.Module):
    """kind: "linear" (A r×Cin, B Cout×r), "per_position" (conv, A r×Cin×kh×kw, B Cout×r×kh×kw: an independent
    rank-r product at every kernel position; MPQ-DM) or "shared_b" (conv, B Cout×r×1×1 shared by all positions;
    EfficientDM)."""

    KINDS = ("linear", "per_position", "shared_b")

    def __init__(self, weight_shape, rank, kind, generator=None):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown LoRA kind {kind!r}")
        cout, cin, *kernel = weight_shape
        self.kind, self.rank = kind, int(rank)
        if kind == "linear":
            a_shape, b_shape = (rank, cin), (cout, rank)
        elif kind == "per_position":
            a_shape, b_shape = (rank, cin, *kernel), (cout, rank, *kernel)
        else:
            a_shape, b_shape = (rank, cin, *kernel), (cout, rank, 1, 1)
        # empty/zeros land on the ambient device (quant.layers builds LoRA under `with torch.device(weight)`)
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        with torch.no_grad():
            self.lora_A.copy_(kaiming_uniform_draw(a_shape, generator))

    def delta_weight(self):
        if self.kind == "linear":
            return self.lora_B @ self.lora_A
        if self.kind == "per_position":
            return torch.einsum("orhw,rihw->oihw", self.lora_B, self.lora_A)
        return torch.einsum("or,rihw->oihw", self.lora_B[:, :, 0, 0], self.lora_A)

    def extra_repr(self):
        return f"kind={self.kind}, rank={self.rank}"
