"""Packed export (quant.export) on the tiny cin-shaped UNet: the exported file reproduces the fake-quantized model.

The quantizer state is set directly (kurtosis split, `max` init, random LoRA/smoothing/per-step activation
scales) instead of running calibration, so the tests stay fast while every stored quantity is non-trivial.
"""
import math
import os

import pytest
import torch
from safetensors import safe_open

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import UserError
from quant.methods import omq
from quant.activation import TemporalActQuantizer
from quant.api import get_method, make_config, quantize_
from quant.export import (PackedLayer, export_quantized, load_export, read_header, snap_zero_points_,
                          theoretical_bytes)
from quant.quantizer import init_max

from refdata import TINY_CIN_UNET, tiny_cin_unet

TIMESTEPS = [1, 334, 667]


def tiny_config():
    return dict(TINY_CIN_UNET)


def tiny_unet():
    return tiny_cin_unet(seed=0)


@torch.no_grad()
def make_qunet(method="mpqdm", w_bits=2, seed=0, lora_rank=4):
    """A quantized tiny UNet in a 'fine-tuned-like' state with integral weight zero points."""
    g = torch.Generator().manual_seed(seed)
    config = make_config(method, w_bits=w_bits, a_bits=4, lora_rank=lora_rank)
    qunet = quantize_(tiny_unet(), config, TIMESTEPS)
    _, handler = get_method(method)
    for _, layer in qunet.quant_layers():
        if layer.smoothing:
            layer.smooth.uniform_(0.5, 2.0, generator=g)
        wq = layer.weight_quantizer
        if method == "efficientdm" and layer.spec.role == "quant":
            handler.init_weights(layer, None, config)          # stores the naive integer weight too
        else:
            w = layer.merged_weight()
            if layer.spec.role == "quant" and method == "mpqdm":
                wq.bits.copy_(omq.allocate(omq.kurtosis(w), w.shape[0] // 4, w_bits))
            elif layer.spec.role == "quant":
                wq.bits.copy_(omq.allocate_plus(omq.kurtosis(w), w_bits))
            delta, zero = init_max(w, wq.bits, per_channel=True)
            wq.delta.copy_(delta * 0.8)                         # shrink the range so some weights clip
            wq.zero.copy_(zero)
        if layer.lora is not None:
            layer.lora.lora_B.normal_(0, 0.02, generator=g)
        layer.clear_cache()
    # activation scales: mse init on each layer's real (smoothed) input in one forward, then per-step spread
    hooks = [layer.register_forward_pre_hook(lambda m, args: m.act_quantizer.calibrate(m.smooth_input(args[0])))
             for _, layer in qunet.quant_layers()]
    x = torch.randn(4, 3, 8, 8, generator=g)
    qunet.unet(x, torch.tensor([1, 334, 667, 667]), context=torch.randn(4, 1, 32, generator=g))
    for h in hooks:
        h.remove()
    for _, layer in qunet.quant_layers():
        act = layer.act_quantizer
        if isinstance(act, TemporalActQuantizer):
            act.delta.mul_(1 + 0.2 * torch.rand(act.delta.shape, generator=g))
            act.make_temporal()
    return qunet.eval()


@torch.no_grad()
def ddim_samples(model, seed=0):
    """Deterministic DDIM (η = 0) with classifier-free guidance over TIMESTEPS; x_T, context from a seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 1, 32, generator=g), torch.randn(1, 1, 32, generator=g).expand(2, 1, 32)
    alphas = torch.cumprod(1 - torch.linspace(0.0015, 0.0195, 1000, dtype=torch.float64), 0).float()
    for k in reversed(range(len(TIMESTEPS))):
        t = TIMESTEPS[k]
        out = model(torch.cat([x, x]), torch.full((4,), t, dtype=torch.long), torch.cat([uncond, cond]))
        e_u, e_c = out.chunk(2)
        eps = e_u + 3.0 * (e_c - e_u)
        a_t = alphas[t]
        a_prev = alphas[TIMESTEPS[k - 1]] if k > 0 else torch.tensor(1.0)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@pytest.fixture(scope="module")
def mpqdm_export(tmp_path_factory):
    qunet = make_qunet("mpqdm")
    path = tmp_path_factory.mktemp("export") / "unet_w2.safetensors"
    header = export_quantized(qunet, path, unet_config=tiny_config())
    return qunet, path, header


def test_samples_are_bitwise_equal_to_fake_quant(mpqdm_export):
    qunet, path, _ = mpqdm_export
    expected = ddim_samples(qunet)
    for kwargs in ({}, {"dequantize_at_load": True}):
        loaded = load_export(path, tiny_config(), **kwargs)
        assert torch.equal(ddim_samples(loaded), expected)
    # the loaded model holds packed integers, not float weights, for every quantized layer
    loaded = load_export(path, tiny_config())
    packed = {n: m for n, m in loaded.unet.named_modules() if isinstance(m, PackedLayer)}
    assert set(packed) == {n for n, _ in qunet.quant_layers()}
    assert all(m.qweight.dtype == torch.uint8 for m in packed.values())


def test_dequantized_weights_match_fake_quantizer_per_layer(mpqdm_export):
    qunet, path, header = mpqdm_export
    loaded = dict(load_export(path, tiny_config()).unet.named_modules())
    for name, layer in qunet.quant_layers():
        assert torch.equal(loaded[name].dequantize(), layer.quantized_weight())
        assert header["layers"][name]["deviation"]["count"] == 0


def test_file_holds_weights_at_their_real_bit_widths(mpqdm_export):
    qunet, path, header = mpqdm_export
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        for name, layer in qunet.quant_layers():
            bits = layer.weight_quantizer.bits.to(torch.int64)
            row_len = layer.weight[0].numel()
            assert fh.get_tensor(f"unet.{name}.qweight").numel() == math.ceil(int(bits.sum()) * row_len / 8)
            assert f"unet.{name}.weight" not in keys and not any(k.startswith(f"unet.{name}.lora") for k in keys)
            assert header["layers"][name]["bits"] == {str(b): int((bits == b).sum()) for b in bits.unique().tolist()}
    # OMQ groups {1,2,3} in quant layers, 8 bits in the four special layers
    assert set(header["layers"]["input_blocks.1.0.in_layers.2"]["bits"]) == {"1", "2", "3"}
    assert header["layers"]["time_embed.0"]["bits"] == {"8": 128}
    assert header["method"] == "mpqdm" and header["timesteps"] == TIMESTEPS and header["format_version"] == 1
    assert header["layer_policy"]["input_blocks.0.0"] == "special"
    fp = [n for n, r in header["layer_policy"].items() if r == "fp"]
    assert fp and all(f"unet.{n}.weight" in keys for n in fp)
    # container overhead is small: the rest is header JSON, tags and < 1 byte of padding per layer
    size = os.path.getsize(path)
    assert theoretical_bytes(path) < size < theoretical_bytes(path) + 64 * 1024 + len(keys) * 256


def test_fractional_zero_points_deviate_only_on_clipped_weights(tmp_path):
    qunet = make_qunet("mpqdm", seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():   # fine-tuning (16k Adam steps at lr 1e-6) moves z off the grid by up to ~0.016
        for _, layer in qunet.quant_layers():
            layer.weight_quantizer.zero.add_(torch.rand(layer.weight_quantizer.zero.shape, generator=g) * 0.032 - 0.016)
            layer.clear_cache()
    header = export_quantized(qunet, tmp_path / "f.safetensors", unet_config=tiny_config())
    loaded_model = load_export(tmp_path / "f.safetensors", tiny_config())
    loaded = dict(loaded_model.unet.named_modules())
    total = 0
    for name, layer in qunet.quant_layers():
        wq = layer.weight_quantizer
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        z, delta = wq.zero.view(view), wq.delta.view(view)
        fake = layer.quantized_weight().detach()
        v = torch.round(layer.merged_weight().detach() / delta) + z
        below, above = v < 0, v > wq.levels() - 1
        diff = (loaded[name].dequantize() - fake).abs()
        assert not bool(diff[~(below | above)].any())                  # unclipped weights: bitwise
        # per channel only one clip side moves, by its distance to the integer grid: the cheaper side
        frac = (z - torch.floor(z)).reshape(-1)
        n_below, n_above = below.reshape(len(frac), -1).sum(1), above.reshape(len(frac), -1).sum(1)
        want = torch.minimum(n_below * frac, n_above * (1 - frac)) * wq.delta
        slack = 1e-5 * wq.delta * (n_below + n_above) + 1e-12    # float rounding of z - floor(z) and of (v - z)·Δ
        assert bool(((diff.reshape(len(frac), -1).sum(1) - want).abs() <= slack).all())
        assert header["layers"][name]["deviation"]["count"] == int((diff > 0).sum())
        assert float(diff.norm() / fake.norm()) < 5e-3
        total += int((diff > 0).sum())
    assert total > 0
    assert torch.isfinite(ddim_samples(loaded_model)).all()


def test_snapped_zero_points_make_the_export_bitwise_again(tmp_path):
    qunet = make_qunet("mpqdm", seed=3)
    with torch.no_grad():
        for _, layer in qunet.quant_layers():
            layer.weight_quantizer.zero.add_(0.01)
            layer.clear_cache()
    largest_delta = max(float(l.weight_quantizer.delta.detach().max()) for _, l in qunet.quant_layers())
    # nearest-integer rounding: only clipped weights move, each by |z - round(z)|·Δ = 0.01·Δ
    assert 0 < snap_zero_points_(qunet) <= 0.01 * largest_delta * (1 + 1e-4)
    assert all(torch.equal(l.weight_quantizer.zero, torch.round(l.weight_quantizer.zero)) for _, l in qunet.quant_layers())
    header = export_quantized(qunet, tmp_path / "s.safetensors", unet_config=tiny_config())
    assert all(l["deviation"]["count"] == 0 for l in header["layers"].values())
    assert torch.equal(ddim_samples(load_export(tmp_path / "s.safetensors", tiny_config())), ddim_samples(qunet))


@pytest.mark.parametrize("method, w_bits", [("mpqdm+", 2), ("efficientdm", 4)])
def test_other_methods_round_trip_bitwise(tmp_path, method, w_bits):
    qunet = make_qunet(method, w_bits=w_bits, seed=2)
    export_quantized(qunet, tmp_path / "m.safetensors", unet_config=tiny_config())
    # a freshly built UNet module works in place of the config
    loaded = load_export(tmp_path / "m.safetensors", UNetModel(**tiny_config()))
    assert torch.equal(ddim_samples(loaded), ddim_samples(qunet))


def test_float16_storage_rounds_only_the_unquantized_tensors(tmp_path, mpqdm_export):
    qunet, path32, _ = mpqdm_export
    path16 = tmp_path / "h.safetensors"
    export_quantized(qunet, path16, unet_config=tiny_config(), float_dtype="float16")
    assert os.path.getsize(path16) < os.path.getsize(path32)
    loaded = load_export(path16, tiny_config())
    got = loaded.state_dict()
    norm = "unet.input_blocks.1.0.in_layers.0.weight"          # a GroupNorm (FP everywhere)
    skip = "unet.output_blocks.0.0.skip_connection.weight"      # an FP layer by policy
    for key in (norm, skip, "unet.input_blocks.1.0.in_layers.2.bias"):
        want = qunet.state_dict()[key]
        assert got[key].dtype == torch.float32 and torch.equal(got[key], want.half().float())
    # quantizer state is never rounded: the quantized weights are still the fake quantizer's, bitwise
    modules = dict(loaded.unet.named_modules())
    for name, layer in qunet.quant_layers():
        assert torch.equal(modules[name].dequantize(), layer.quantized_weight())


def test_mismatches_and_damaged_files_are_user_errors(tmp_path, mpqdm_export):
    _, path, header = mpqdm_export
    data = path.read_bytes()
    other = dict(tiny_config(), context_dim=64)
    with pytest.raises(UserError, match="hash"):
        load_export(path, other)
    with pytest.raises(UserError, match="shape"):
        load_export(path, UNetModel(**other))      # a module carries no hash: the shapes disagree
    with pytest.raises(UserError, match="missing"):
        load_export(path, UNetModel(**dict(tiny_config(), num_res_blocks=1)))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match="truncated"):
        load_export(bad, tiny_config())
    flipped = bytearray(data)
    flipped[-50] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="corrupt"):
        load_export(bad, tiny_config())
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError):
        read_header(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_export(tmp_path / "missing.safetensors", tiny_config())
