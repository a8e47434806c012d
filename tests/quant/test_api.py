import collections
import dataclasses
import os

import pytest
import torch

from ldm.util import UserError
from quant import (calibrate, convert_schedule, load_quantized, make_config, param_groups,
                   quantize_, save_quantized)
from quant.layers import QuantConv2d, QuantLinear, QuantMatMul
from quant.policy import SPECIAL_LAYERS, classify

from refdata import TINY_CIN_UNET, ref_dir, require

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMESTEPS = [1, 51, 101, 151]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(method="mpqdm", a_bits=1), "activation bits"), (dict(method="mpqdm", a_bits=9), "activation bits"),
    (dict(method="mpqdm", w_bits=1), "between 1 and 8"), (dict(method="mpqdm", w_bits=8), "between 1 and 8"),
    (dict(method="mpqdm+", w_bits=8), "between 1 and 8"), (dict(method="efficientdm", w_bits=0), "between 1 and 8"),
    (dict(method="efficientdm", w_bits=9), "between 1 and 8"), (dict(method="nope"), "unknown quantization method"),
    (dict(method="mpqdm", conv_lora="x"), "conv_lora"), (dict(method="mpqdm", trd_mode="x"), "trd_mode"),
    (dict(method="efficientdm", omq=True), "no option"),
])
def test_invalid_config_is_user_error(kwargs, fragment):
    kwargs = dict(kwargs)
    with pytest.raises(UserError, match=fragment):
        make_config(kwargs.pop("method"), **kwargs)


def test_valid_configs_and_defaults():
    assert make_config("efficientdm", w_bits=1).w_bits == 1
    assert make_config("mpqdm", w_bits=2, omq=False).weight_bit_groups() == (2,)
    cfg = make_config("mpqdm", w_bits=2, a_bits=4)
    assert (cfg.smoothing, cfg.weight_init, cfg.conv_lora, cfg.lora_rank) == (True, "mse", "per_position", 32)
    e = make_config("efficientdm")
    assert (e.smoothing, e.weight_init, e.conv_lora) == (False, "max", "shared_b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.w_bits = 3


@pytest.mark.parametrize("name, conv, lin", [("cin256-v2", 81, 184), ("lsun_bedrooms-ldm-vq-4", 49, 24),
                                             ("lsun_churches-ldm-kl-8", 72, 37)])
def test_policy_counts_full_size_meta(name, conv, lin):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    config = OmegaConf.load(os.path.join(REPO, "configs", "latent-diffusion", f"{name}.yaml"))
    with torch.device("meta"):  # the repository's own config, full size, without allocating any weight
        unet = instantiate_from_config(config.model.params.unet_config)
    mods = dict(unet.named_modules())
    roles = classify(unet)
    kinds = collections.Counter((r, type(mods[n]).__name__) for n, r in roles.items())
    assert kinds[("quant", "Conv2d")] + kinds[("special", "Conv2d")] == conv
    assert kinds[("quant", "Linear")] + kinds[("special", "Linear")] == lin
    assert [n for n, r in roles.items() if r == "special"] == sorted(SPECIAL_LAYERS, key=list(roles).index)
    fp = [n for n, r in roles.items() if r == "fp"]
    skips = [n for n in fp if n.endswith("skip_connection")]
    downs = [n for n in fp if n.endswith(".op")]
    conv1d = [n for n in fp if isinstance(mods[n], torch.nn.Conv1d)]
    expected = {"cin256-v2": (15, 3, 0), "lsun_bedrooms-ldm-vq-4": (15, 3, 32), "lsun_churches-ldm-kl-8": (17, 0, 42)}
    assert (len(skips), len(downs), len(conv1d)) == expected[name] and len(fp) == sum(expected[name])
    if name == "cin256-v2":   # quantize_ on the meta device builds the full structure without any data
        q = quantize_(unet, make_config("mpqdm", w_bits=2, a_bits=4), list(range(1, 1000, 50)))
        assert len(q.quant_layers()) == 265
        assert sum(m.weight.numel() for _, m in q.quant_layers() if m.spec.role == "quant") == 385_941_504


def _calib_batch(config):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 8, 8, generator=g)
    t = torch.tensor(TIMESTEPS * 2)
    c = torch.randn(8, 1, config["context_dim"], generator=g)
    return x, t, c


@pytest.fixture(scope="module")
def calibrated(tiny_cin):
    build, config = tiny_cin
    cfg = make_config("mpqdm", w_bits=3, a_bits=6, lora_rank=4, quantize_attention_matmuls=True)
    q = quantize_(build(), cfg, TIMESTEPS)
    log = calibrate(q, *_calib_batch(config))
    return q, log


def test_quantize_and_calibrate_tiny_unet(calibrated, tiny_cin):
    q, log = calibrated
    build, config = tiny_cin
    layers = dict(q.quant_layers())
    assert isinstance(layers["input_blocks.0.0"], QuantConv2d) and layers["input_blocks.0.0"].spec.role == "special"
    assert isinstance(layers["time_embed.2"], QuantLinear)
    assert len(q.quant_matmuls()) > 0 and all(isinstance(m, QuantMatMul) for _, m in q.quant_matmuls())
    assert all(bool(m.calibrated) for _, m in q.quant_layers())
    quant_logs = [v for v in log.values() if v.get("role") == "quant"]
    assert quant_logs and all(v["avg_bits"] == 3.0 for v in quant_logs)
    assert all(set(v["bits"]) <= {"2", "3", "4"} for v in quant_logs)
    x, t, c = _calib_batch(config)
    fp = build()
    with torch.no_grad():
        out, ref = q(x[:2], torch.tensor([51, 51]), context=c[:2]), fp(x[:2], torch.tensor([51, 51]), context=c[:2])
    assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 0.5
    with pytest.raises(UserError, match="not in the quantized model's schedule"):
        q(x[:2], torch.tensor([52, 52]), context=c[:2])


def test_save_load_fresh_model_identical_without_forward(calibrated, tiny_cin, tmp_path):
    q, log = calibrated
    build, config = tiny_cin
    param_groups(q)                     # entries become temporal; perturb them so per-step state matters
    with torch.no_grad():
        for _, layer in q.quant_layers():
            if layer.spec.role == "quant":
                layer.act_quantizer.delta.mul_(torch.linspace(0.9, 1.1, len(TIMESTEPS)))
                layer.lora.lora_B.normal_(0, 1e-3, generator=torch.Generator().manual_seed(1))
    save_quantized(q, tmp_path / "q.pt", {"omq": log})
    q2, meta = load_quantized(build(), tmp_path / "q.pt")
    assert meta["timesteps"] == TIMESTEPS and meta["method"] == "mpqdm" and "omq" in meta
    x, _, c = _calib_batch(config)
    with torch.no_grad():
        for t in TIMESTEPS:
            tt = torch.tensor([t, t])
            assert torch.equal(q(x[:2], tt, context=c[:2]), q2(x[:2], tt, context=c[:2]))
    assert not bool(q2.unet.get_submodule("out.2").act_quantizer.delta.requires_grad)
    # schedule conversion keeps entries by timestep value
    d_before = dict(q2.quant_layers())["output_blocks.0.0.in_layers.2"].act_quantizer.delta.detach().clone()
    convert_schedule(q2, [151, 1])
    d_after = dict(q2.quant_layers())["output_blocks.0.0.in_layers.2"].act_quantizer.delta
    assert torch.equal(d_after.detach(), d_before[[3, 0]]) and q2.table.lookup(torch.tensor([1])) == 1


def test_param_groups_learning_rates(tiny_cin):
    build, _ = tiny_cin
    for method, plus in (("mpqdm", 0.01), ("efficientdm", 0.0)):
        q = quantize_(build(), make_config(method, w_bits=4, a_bits=8, lora_rank=2), TIMESTEPS)
        with torch.no_grad():
            for i, (_, layer) in enumerate(q.quant_layers()):
                layer.weight_quantizer.delta.fill_(0.01 * (i + 1))
        groups = param_groups(q)
        by_name = {g["name"]: g for g in groups}
        layers = dict(q.quant_layers())
        for name, layer in layers.items():
            if layer.spec.role == "special":
                assert f"lora:{name}" not in by_name and not layer.weight_quantizer.delta.requires_grad
                continue
            g = by_name[f"lora:{name}"]
            assert g["lr"] == pytest.approx((layer.weight_quantizer.delta.mean().item() + plus) / 2500)
        wq = {id(p) for p in by_name["weight_quant"]["params"]}
        some = layers["input_blocks.1.0.in_layers.2"].weight_quantizer
        assert id(some.delta) in wq and (id(some.zero) in wq) == (method == "mpqdm")
        assert by_name["weight_quant"]["lr"] == 1e-6 and by_name["act_quant"]["lr"] == 5e-4
        assert all(g["weight_decay"] == 0.01 for g in groups)
        trainable = {id(p) for p in q.parameters() if p.requires_grad}
        assert trainable == {id(p) for g in groups for p in g["params"]}


def test_tiny_unet_is_the_reference_vectors_structure():
    """The quant tests' tiny UNet (tests/refdata.py) has the config of the reference vector a_unet_cin_tiny."""
    record = torch.load(require(ref_dir() / "vectors" / "a_unet_cin_tiny.pt"), weights_only=True)
    assert dict(record["config"]) == TINY_CIN_UNET
