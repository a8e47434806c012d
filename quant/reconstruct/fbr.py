"""EDA-DM's FBR (Fine-grained Block Reconstruction, PEERS.md §2.3) and QDrop (§2.2), as an ``Objective``.

- QDrop, during reconstruction only: every activation quantizer of the unit keeps its quantized output element-wise
  with probability 1 - p and passes the FP input through otherwise (forward hooks installed by ``active`` and
  removed on exit, so evaluation and sampling never see them); the unit's inputs are the cached quantized-model
  inputs mixed element-wise with the cached FP inputs the same way (``unit_inputs``).
- Loss: L = L_block + add_loss · Σ L_layer, each the mean over batch·positions of Σ over dim 1 of (ŷ - y)^2. The
  layer terms cover every quantized layer of the unit in registration order except the last (``layer_loss_set``),
  from a second quantized forward with fresh QDrop noise on the same mixed inputs [T: the released code re-mixes
  nothing there either]; their targets are the FP layers' outputs inside the FP unit run on the FP inputs.
- Trained jointly: AdaRound V (Adam lr_w) and every activation Δ (Adam lr_a), both cosine to 0, no rounding
  regulariser, hard rounding at the end (the trainables of quant.reconstruct.objectives).
"""
import contextlib

import torch

from quant.layers import QuantLayer
from quant.reconstruct.objectives import Objective, act_quantizers, lp_loss


def layer_loss_set(module):
    """Names (relative to the unit) of the quantized layers whose outputs FBR adds to the block loss: all of the
    unit's QuantLayers in registration order but the last (none for a lone layer)."""
    return [n for n, m in module.named_modules() if isinstance(m, QuantLayer)][:-1]


def _keep_mask(shape, p, generator, device):
    """True where the quantized value is kept (probability 1 - p); drawn on the CPU generator for reproducibility."""
    return (torch.rand(shape, generator=generator) >= p).to(device)


def mix(q, fp, p, generator):
    """QDrop on a (nested) input: element-wise the quantized value with probability 1 - p, else the FP one; non-float
    leaves (None, integer timesteps) and tensors that are the same object are taken as they are."""
    if isinstance(q, torch.Tensor):
        if q is fp or not q.is_floating_point() or p == 0:
            return q
        return torch.where(_keep_mask(q.shape, p, generator, q.device), q, fp)
    if isinstance(q, (tuple, list)):
        return type(q)(mix(a, b, p, generator) for a, b in zip(q, fp))
    if isinstance(q, dict):
        return {k: mix(v, fp[k], p, generator) for k, v in q.items()}
    return q


@contextlib.contextmanager
def qdrop(quantizers, p, generator):
    """While active, each quantizer's output is mixed with its input (QDrop, drop probability p)."""
    if p == 0:
        yield
        return

    def hook(_module, args, output):
        return torch.where(_keep_mask(output.shape, p, generator(), output.device), output, args[0])

    handles = [q.register_forward_hook(hook) for q in quantizers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def layer_outputs(module, names, store):
    """Record the outputs of the named submodules of ``module`` into ``store`` (name -> tensor)."""
    handles = []
    for name in names:
        def hook(_m, _args, output, name=name):
            store[name] = output
        handles.append(module.get_submodule(name).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class FBRObjective(Objective):
    """EDA-DM's joint W/A block reconstruction; see the module docstring."""

    def __init__(self, trainables, add_loss=1.0, qdrop_p=0.5):
        super().__init__(trainables, p=2.0, input_source="quantized", act_quant=True, inputs_act_quant=True)
        self.add_loss, self.qdrop_p = float(add_loss), float(qdrop_p)
        self._generator = None

    @property
    def needs(self):
        return {"q", "fp"} if self.qdrop_p > 0 or self.add_loss > 0 else {"q"}

    @contextlib.contextmanager
    def active(self, module, fp_module):
        with super().active(module, fp_module), qdrop(act_quantizers(module, max_bits=16), self.qdrop_p,
                                                      lambda: self._generator):
            yield

    def unit_inputs(self, batch, generator):
        self._generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if self.qdrop_p == 0:
            return batch["q"]
        return mix(batch["q"], batch["fp"], self.qdrop_p, self._generator)

    def layer_losses(self, ctx):
        """Σ over ``layer_loss_set`` of the layer errors (second quantized forward against the FP unit)."""
        names = layer_loss_set(ctx.module)
        if not names or self.add_loss == 0:
            return None
        fp_args, fp_kwargs = ctx.batch["fp"]
        with torch.no_grad(), layer_outputs(ctx.fp_module, names, {}) as fp_out:
            ctx.unit.run(ctx.fp_module, fp_args, fp_kwargs)
        with layer_outputs(ctx.module, names, {}) as q_out:
            ctx.unit.run(ctx.module, ctx.args, ctx.kwargs)
        return sum(lp_loss(q_out[n], fp_out[n], 2.0) for n in names)

    def loss(self, ctx):
        block = lp_loss(ctx.output, ctx.batch["target"], self.p)
        layers = self.layer_losses(ctx)
        return block, (self.add_loss * layers if layers is not None else torch.zeros((), device=block.device))
