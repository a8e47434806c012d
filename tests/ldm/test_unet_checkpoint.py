"""Gradient checkpointing (CONTRACTS interface 1): correct parameter gradients, and the recomputation in backward
runs in the contextvars context captured at forward time."""
import contextvars

import pytest
import torch

import ldm.modules.attention as attention_mod
import ldm.modules.diffusionmodules.openaimodel as openaimodel_mod
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import checkpoint

STEP = contextvars.ContextVar("STEP", default=-1)

# Spatial transformer (always-checkpointed transformer blocks) + use_checkpoint ResBlocks.
TINY_SD = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
               num_res_blocks=1, channel_mult=[1, 1], num_heads=2, use_spatial_transformer=True,
               transformer_depth=1, context_dim=32, legacy=False)
# Legacy AttentionBlock (always checkpointed) with scale-shift norm and resblock up/down.
TINY_ADM = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                num_res_blocks=1, channel_mult=[1, 1], num_heads=2, use_scale_shift_norm=True, resblock_updown=True)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers would hide most gradient paths
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _grads(model, x, t, context):
    model.zero_grad()
    out = model(x, t, context=context)
    (out ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", [TINY_SD, TINY_ADM], ids=["spatial_transformer", "attention_block"])
def test_checkpointed_param_grads_equal_plain(cfg, monkeypatch):
    model = UNetModel(**cfg, use_checkpoint=True).train()
    _randomise(model, 0)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([17, 803])
    context = torch.randn(2, 5, 32, generator=g) if cfg.get("context_dim") else None

    # count executions of a conv inside a ResBlock: 2 = forward + recomputation, proving checkpointing is active
    calls = []
    hook = model.input_blocks[1][0].in_layers[2].register_forward_hook(lambda *a: calls.append(1))
    with_ckpt = _grads(model, x, t, context)
    hook.remove()
    assert len(calls) == 2

    # reference: the same model with every checkpoint bypassed (AttentionBlock and transformer blocks included)
    plain = lambda func, inputs, params, flag: func(*inputs)
    monkeypatch.setattr(openaimodel_mod, "checkpoint", plain)
    monkeypatch.setattr(attention_mod, "checkpoint", plain)
    without = _grads(model, x, t, context)
    assert with_ckpt.keys() == without.keys()
    for name in without:
        torch.testing.assert_close(with_ckpt[name], without[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sum(g.abs().sum() > 0 for g in without.values()) == len(without)


def test_contextvar_replayed_during_recomputation_in_unet():
    model = UNetModel(**TINY_SD, use_checkpoint=True).train()
    _randomise(model, 0)
    seen = []
    # one module inside a checkpointed ResBlock, one inside an (always checkpointed) transformer block
    for mod in (model.input_blocks[1][0].in_layers[2], model.input_blocks[1][1].transformer_blocks[0].attn2.to_q):
        mod.register_forward_hook(lambda m, i, o: seen.append(STEP.get()))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([17, 803]), torch.randn(2, 5, 32)
    token = STEP.set(7)
    out = model(x, t, context=c)
    STEP.reset(token)
    STEP.set(3)  # changed before backward: the replay must still see 7
    n_forward = len(seen)
    out.sum().backward()
    assert seen[:n_forward] == [7, 7] and len(seen) == 4
    assert seen[n_forward:] == [7, 7]
    assert STEP.get() == 3  # the caller's context is untouched by the replay


def test_checkpoint_function_uses_forward_time_value_for_gradients():
    scale = contextvars.ContextVar("scale", default=1.0)

    def func(x, w):
        return torch.tanh(x * w * scale.get()) ** 2  # backward needs recomputed activations that depend on scale

    x = torch.randn(5)
    w = torch.randn(5, requires_grad=True)
    scale.set(3.0)
    out = checkpoint(func, (x, w), [w], True)
    scale.set(-11.0)
    out.sum().backward(retain_graph=True)
    first = w.grad.clone()
    w.grad = None
    out.sum().backward()  # a second replay sees the same captured value
    u = torch.tanh(3.0 * x * w.detach())
    expected = 2 * u * (1 - u ** 2) * 3.0 * x  # d/dw tanh(3xw)^2
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(w.grad, expected)


def test_checkpoint_flag_off_or_no_grad_calls_directly():
    calls = []

    def func(x):
        calls.append(torch.is_grad_enabled())
        return x * 2

    x = torch.ones(3, requires_grad=True)
    checkpoint(func, (x,), [], False).sum().backward()
    with torch.no_grad():
        assert torch.equal(checkpoint(func, (x,), [], True), torch.full((3,), 2.0))
    assert calls == [True, False]
    assert torch.equal(x.grad, torch.full((3,), 2.0))
