"""Which modules are reconstruction units, in forward-execution order (PEERS.md §1.3).

A unit is a block (a module of one of the family's unit classes: ResBlock, BasicTransformerBlock, legacy
AttentionBlock; DDIM: ResnetBlock, AttnBlock) or a lone quantized layer outside every block. The order comes
from one traced forward of the quantized model, never from ``named_modules`` order (the DDIM model stores its
decoder levels reversed). A method may edit the plan before the driver runs it: e.g. TFMQ-DM puts a custom
unit (its Temporal Information Block, inputs = the UNet's timesteps) first and drops the lone time-MLP layers.

``Unit`` is plain: ``name`` (its id and, by default, its module's name), ``hook`` (the module whose forward
pre-hook sees the unit's inputs; "" = the model itself), ``build(model)`` (the module to optimise; default the
submodule ``name``), ``select(args, kwargs)`` (which captured inputs the unit takes) and ``call(module, args,
kwargs)`` (how to run it).
"""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from quant.layers import QuantLayer
from quant.policy import UNIT_CLASSES


@dataclass
class Unit:
    name: str
    kind: str = "block"                    # "block" | "layer" | a custom kind
    hook: Optional[str] = None             # default: name
    build: Optional[Callable] = None       # model -> module; default model.get_submodule(name)
    select: Optional[Callable] = None      # (args, kwargs) -> (args, kwargs); default: all
    call: Optional[Callable] = None        # (module, args, kwargs) -> output; default module(*args, **kwargs)
    info: dict = field(default_factory=dict)

    @property
    def hook_name(self):
        return self.name if self.hook is None else self.hook

    def module(self, model):
        return self.build(model) if self.build is not None else model.get_submodule(self.name)

    def inputs(self, args, kwargs):
        return self.select(args, kwargs) if self.select is not None else (tuple(args), dict(kwargs))

    def run(self, module, args, kwargs):
        return self.call(module, args, kwargs) if self.call is not None else module(*args, **kwargs)


@torch.no_grad()
def plan_units(model, sample, unit_classes=None, family=None):
    """Units of ``model`` (the quantized UNet) in forward-execution order, traced on ``sample`` = (args, kwargs)
    of one small forward. Quantized layers inside a unit belong to it; the rest become layer units."""
    classes = tuple(unit_classes if unit_classes is not None else UNIT_CLASSES[family])
    order, depth, handles = [], [0], []

    def pre(name, is_unit):
        def hook(module, args):
            if depth[0] == 0 and name not in seen:
                seen.add(name)
                order.append(Unit(name, "block" if is_unit else "layer"))
            if is_unit:
                depth[0] += 1
        return hook

    def post(module, args, output):
        depth[0] -= 1

    seen = set()
    for name, m in model.named_modules():
        if not name:
            continue
        is_unit = type(m).__name__ in classes
        if is_unit or isinstance(m, QuantLayer):
            handles.append(m.register_forward_pre_hook(pre(name, is_unit)))
            if is_unit:
                handles.append(m.register_forward_hook(post))
    try:
        args, kwargs = sample
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order


@contextlib.contextmanager
def no_checkpointing(module):
    """Turn off gradient checkpointing flags (``checkpoint`` / ``use_checkpoint``) inside a unit while it is
    optimised: a unit is small, and recomputing its forward in every backward would only cost time."""
    saved = []
    for m in module.modules():
        for attr in ("checkpoint", "use_checkpoint"):
            if isinstance(getattr(m, attr, None), bool):
                saved.append((m, attr, getattr(m, attr)))
                setattr(m, attr, False)
    try:
        yield module
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


def unit_layers(module):
    """(name, QuantLayer) inside a unit module (the module itself when it is a layer)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantLayer)]
