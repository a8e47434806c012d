"""AdamW parameter groups for fine-tuning (MPQ-DM.md §9).

Groups: one per quantized layer for its LoRA factors at lr = avg_Δ/2500 (avg_Δ from the method, in the
smoothed-weight domain, fixed now), one for all weight-quantizer Δ (and z unless the method freezes it) at
1e-6, one for all activation-quantizer Δ/z lists at 5e-4. Everything else, the special layers included, is
frozen. Weight decay (default 0.01) on every group; quant.stages.finetune sets it from FinetuneConfig.weight_decay.
"""
from quant.activation import TemporalActQuantizer
from quant.api import get_method

LORA_LR_DIVISOR = 2500.0
WEIGHT_QUANT_LR = 1e-6
ACT_QUANT_LR = 5e-4
WEIGHT_DECAY = 0.01


def param_groups(qunet, method=None, lora_lr_scale=1.0, weight_decay=WEIGHT_DECAY):
    """Freeze the model, re-enable the trainable tensors, and return the AdamW groups.

    lora_lr_scale multiplies every LoRA group's lr (1.0 = the paper's avg_Δ/2500). MPQ-DM's avg_Δ is taken in
    the smoothed domain while LoRA updates the unsmoothed weight, so a layer's effective step is about s times
    larger; on the digits model 0.1 is what keeps W2A4 fine-tuning from degrading the naive model.
    weight_decay: AdamW's decoupled decay of every group (finetune() overrides it with its config's value).

    Also switches every temporal activation quantizer out of its shared state: from now on their entries may
    diverge, so every forward must carry a step index (QuantUNet does this from the timestep).
    """
    _, handler = get_method(method or qunet.config.method)
    qunet.requires_grad_(False)
    groups, weight_q, act_q = [], [], []
    for name, layer in qunet.quant_layers():
        if layer.spec.role == "special":
            continue
        if layer.lora is not None:
            lora = [layer.lora.lora_A, layer.lora.lora_B]
            groups.append({"params": lora, "lr": handler.lora_lr_delta(layer) / LORA_LR_DIVISOR * lora_lr_scale,
                           "weight_decay": weight_decay, "name": f"lora:{name}"})
        weight_q.append(layer.weight_quantizer.delta)
        if handler.train_weight_zero:
            weight_q.append(layer.weight_quantizer.zero)
        act_q += [layer.act_quantizer.delta, layer.act_quantizer.zero]
    for _, mm in qunet.quant_matmuls():
        for q in mm.input_quantizers:
            act_q += [q.delta, q.zero]
    groups.append({"params": weight_q, "lr": WEIGHT_QUANT_LR, "weight_decay": weight_decay, "name": "weight_quant"})
    groups.append({"params": act_q, "lr": ACT_QUANT_LR, "weight_decay": weight_decay, "name": "act_quant"})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    for m in qunet.modules():
        if isinstance(m, TemporalActQuantizer):
            m.make_temporal()
    return groups
