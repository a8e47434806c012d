"""The naive quantization stage (MPQ-DM.md §6): one sequential no-grad forward over the calibration batch.

Forward pre-hooks calibrate each quantized layer the first time it is reached, with its real input (already
the output of the quantized layers upstream); the layer then runs quantized for the rest of the forward. Per
layer, in order: smoothing s (§7.1), the method's weight init (EfficientDM: max; MPQ-DM: OMQ search then mse),
then the activation quantizer's mse init on X/s.
"""
import contextlib

import torch

from quant.api import get_method
from quant.methods.omq import smoothing_factors
from quant.quantizer import init_max, init_mse


@torch.no_grad()
def calibrate_layer(layer, x, handler, config):
    """Calibrate one QuantLayer on its input x; returns the method's per-layer log (e.g. OMQ choice)."""
    if layer.spec.role == "special":
        init = init_mse if config.weight_init == "mse" else init_max
        delta, zero = init(layer.weight, 8, per_channel=True)
        layer.weight_quantizer.delta.copy_(delta)
        layer.weight_quantizer.zero.copy_(zero)
        log = {"role": "special", "cout": int(layer.weight.shape[0]), "bits": {"8": int(layer.weight.shape[0])}}
    else:
        if layer.smoothing:
            layer.smooth.copy_(smoothing_factors(x, layer.weight, config.smoothing_alpha))
        log = {"role": "quant", **handler.init_weights(layer, x, config)}
    if layer.act_quantizer is not None:                  # a policy may leave a layer's input unquantized
        x_s = layer.smooth_input(x)
        if layer.split:
            layer.act_quantizer.calibrate(x_s[:, :layer.split])
            layer.act_quantizer_split.calibrate(x_s[:, layer.split:])
        else:
            layer.act_quantizer.calibrate(x_s)
    layer.calibrated.fill_(True)
    layer.clear_cache()
    return log


@contextlib.contextmanager
def calibration_hooks(qunet, log):
    """Attach first-reach calibration hooks to every uncalibrated quantized module; removed on exit."""
    _, handler = get_method(qunet.config.method)
    handles = []

    def layer_hook(name):
        def hook(module, args):
            if not bool(module.calibrated):
                log[name] = calibrate_layer(module, args[0], handler, qunet.config)
        return hook

    def matmul_hook(name):
        def hook(module, args):
            if not bool(module.calibrated):
                for quantizer, x in zip(module.input_quantizers, args[:2]):
                    quantizer.calibrate(x)
                module.calibrated.fill_(True)
                log[name] = {"role": "matmul"}
        return hook

    try:
        for name, m in qunet.quant_layers():
            handles.append(m.register_forward_pre_hook(layer_hook(name)))
        for name, m in qunet.quant_matmuls():
            handles.append(m.register_forward_pre_hook(matmul_hook(name)))
        yield log
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(qunet, x, t, context=None, **unet_kwargs):
    """Run the naive stage on one calibration batch (x [N,...], t [N] long, context [N,...] or None).

    The tuples may mix timesteps, so the UNet is called directly (no step index): every temporal quantizer
    is still in its shared state. Returns {layer name: log} for the artifact meta (OMQ m/Cout, bit histogram).
    """
    log = {}
    was_training = qunet.training
    qunet.eval()
    try:
        with calibration_hooks(qunet, log):
            if context is not None:  # the pixel family's network takes no context argument
                unet_kwargs = {**unet_kwargs, "context": context}
            qunet.unet(x, t, **unet_kwargs)
    finally:
        qunet.train(was_training)
    missing = [n for n, m in qunet.quant_layers() if not bool(m.calibrated)]
    if missing:
        raise RuntimeError(f"{len(missing)} quantized layers were not reached by the calibration forward "
                           f"(first: {missing[0]})")
    return log


def draw_calibration_batch(entries, n, seed):
    """Draw n random (x, t, context) tuples from recorder entries (each {"x","t","context"} with rows
    along dim 0) with a seeded generator; returns stacked (x, t, context-or-None)."""
    xs = torch.cat([e["x"] for e in entries])
    ts = torch.cat([e["t"] for e in entries])
    has_ctx = entries[0].get("context") is not None
    cs = torch.cat([e["context"] for e in entries]) if has_ctx else None
    if n > xs.shape[0]:
        raise ValueError(f"asked for {n} calibration tuples but only {xs.shape[0]} were recorded")
    idx = torch.randperm(xs.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return xs[idx], ts[idx], (cs[idx] if has_ctx else None)
