"""The layer policy as data (quant.policy): MPQ-DM's table reproduces the old hard-coded roles, Q-Diffusion's table
wraps everything and splits the decoder skip convs at the channel count a meta-device shape trace measures, the
DDIM rules resolve on the DDIM checkpoint's module names, and the policy travels in the artifact meta."""
import collections
import json
import os

import pytest
import torch
from torch import nn

from ldm.util import UserError
from quant import build_from_meta, make_config, quantize_
from quant.layers import QuantConv1d, QuantLayer
from quant.policy import MPQDM_RULES, classify, model_family, resolve, split_points

from refdata import shared_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _meta_unet(name):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    config = OmegaConf.load(os.path.join(REPO, "configs", "latent-diffusion", f"{name}.yaml"))
    with torch.device("meta"):
        return instantiate_from_config(config.model.params.unet_config), config.model.params.unet_config.params


def _old_roles(unet):
    """The pre-table MPQ-DM classification, written out again: W8A8 by name, FP by parent class."""
    modules = dict(unet.named_modules())
    roles = collections.OrderedDict()
    for name, m in modules.items():
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        parent = type(modules[name.rsplit(".", 1)[0]]).__name__
        child = name.rsplit(".", 1)[-1]
        if name in ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2"):
            roles[name] = "special"
        elif not isinstance(m, (nn.Conv2d, nn.Linear)) or (parent, child) in {("ResBlock", "skip_connection"),
                                                                                ("Downsample", "op")}:
            roles[name] = "fp"
        else:
            roles[name] = "quant"
    return roles


def _h_channels_by_trace(unet, params):
    """Channels of h entering each decoder block (output of the block run before it), by a meta-device forward."""
    seen = {}
    hooks = [unet.middle_block.register_forward_hook(lambda m, a, o: seen.__setitem__(-1, o.shape[1]))]
    for i, block in enumerate(unet.output_blocks):
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.shape[1])))
    kwargs = {"context": torch.empty(1, 1, params.context_dim, device="meta")} if params.get("context_dim") else {}
    unet(torch.empty(1, params.in_channels, params.image_size, params.image_size, device="meta"),
         torch.zeros(1, dtype=torch.long, device="meta"), **kwargs)
    for h in hooks:
        h.remove()
    return [seen[i - 1] for i in range(len(unet.output_blocks))]


@pytest.mark.parametrize("name", ["lsun_bedrooms-ldm-vq-4", "lsun_churches-ldm-kl-8", "digits-ldm-vq-4"])
def test_mpqdm_table_reproduces_old_roles_and_qdiffusion_wraps_all(name):
    unet, params = _meta_unet(name)
    assert model_family(unet) == "compvis_unet"
    assert classify(unet) == _old_roles(unet)
    candidates = {n: type(m) for n, m in unet.named_modules() if isinstance(m, CONV_LINEAR)}
    h_channels = _h_channels_by_trace(unet, params)
    q = quantize_(unet, make_config("qdiffusion", w_bits=4, a_bits=8), [1, 501])
    layers = dict(q.quant_layers())
    assert set(layers) == set(candidates)                       # nothing FP (PEERS.md §1.3)
    assert sum(isinstance(m, QuantConv1d) for m in layers.values()) == \
        sum(t is nn.Conv1d for t in candidates.values())
    split = {n: m.split for n, m in layers.items() if m.split}
    expected = {f"output_blocks.{i}.0.skip_connection": h for i, h in enumerate(h_channels)}
    assert split == expected
    for n in split:   # split quantizers exist from construction, each with its own state
        assert {f"{n}.weight_quantizer_split.delta", f"{n}.act_quantizer_split.delta"} <= \
            set(k[len("unet."):] for k in q.state_dict())
    assert q.meta()["policy"]["family"] == "compvis_unet" and q.meta()["training"] == "ptq"
    no_split = quantize_(_meta_unet(name)[0], make_config("qdiffusion", split=False), [1, 501])
    assert not any(m.split for _, m in no_split.quant_layers())


def _ddim_mock(keys):
    """A module tree with the DDIM checkpoint's names: Conv2d / Linear of the recorded shapes (meta), containers
    with numeric children as ModuleLists. No forward; enough for name-based rules and structural split points."""
    tree = {}
    for key, shape, _ in keys:
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        node = tree
        *path, leaf = key[:-len(".weight")].split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = shape

    def build(node):
        if isinstance(node, list):
            if len(node) == 4:
                return nn.Conv2d(node[1], node[0], node[2], device="meta")
            return nn.Linear(node[1], node[0], device="meta")
        children = {k: build(v) for k, v in node.items()}
        if all(k.isdigit() for k in children):
            return nn.ModuleList([children[str(i)] for i in range(len(children))])
        m = nn.Module()
        for k, v in children.items():
            m.add_module(k, v)
        return m
    return build(tree)


def test_ddim_rules_on_checkpoint_names():
    path = shared_dir() / "reference" / "ddim" / "state_dicts.json"
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    record = json.load(open(path))["cifar10"]
    mock = _ddim_mock(record["keys"])
    assert model_family(mock) == "ddim_model"
    names = [n for n, m in mock.named_modules() if isinstance(m, CONV_LINEAR)]
    assert len(names) == 89 + 24                               # TXT2IMG_CIFAR.md §B.1 counts
    mpq = resolve(mock, MPQDM_RULES["ddim_model"], "ddim_model")
    assert [n for n, f in mpq.items() if f and f.get("role") == "special"] == \
        ["temb.dense.0", "temb.dense.1", "conv_in", "conv_out"]
    fp = sorted(n for n, f in mpq.items() if f is None)
    assert fp == sorted(n for n in names if n.endswith("nin_shortcut") or n.endswith("downsample.conv"))
    from quant.api import get_method
    rules = get_method("qdiffusion")[1].policy_rules(make_config("qdiffusion"), "ddim_model")
    qd = resolve(mock, rules, "ddim_model")
    assert all(f is not None for f in qd.values()) and len(qd) == len(names)
    split = {n: f["split"] for n, f in qd.items() if f.get("split")}
    assert sorted(split) == sorted(n for n in names if n.startswith("up.") and n.endswith("nin_shortcut"))
    assert len(split) == 12
    try:                                  # the DDIM package records the split point of each decoder block
        from types import SimpleNamespace

        from ddim.models.diffusion import Model
    except ImportError:
        return
    cfg = SimpleNamespace(model=SimpleNamespace(**record["model"]),
                          data=SimpleNamespace(image_size=record["image_size"]),
                          diffusion=SimpleNamespace(num_diffusion_timesteps=1000))
    with torch.device("meta"):
        model = Model(cfg)
    assert split == {f"{n}": model.get_submodule(n.rsplit(".", 1)[0]).h_channels for n in split}
    assert split == split_points(model)


def test_policy_is_recorded_and_reapplied_by_build_from_meta(tiny_cin):
    build, _ = tiny_cin
    custom = {"family": "compvis_unet", "rules": [
        {"match": "out.2", "set": {"act_quant": False, "w_bits": 8}},
        {"match": "time_embed.*", "set": {"fp": True}},
        {"match": "output_blocks.*.0.skip_connection", "set": {"split": True, "a_bits": 6}},
        {"match": "*", "set": {}}]}
    q = quantize_(build(), make_config("qdiffusion", w_bits=3, a_bits=4), [1, 11], policy=custom)
    meta = json.loads(json.dumps(q.meta()))                # plain data
    assert meta["policy"] == custom
    q2 = build_from_meta(build(), meta)
    layers = dict(q2.quant_layers())
    assert "time_embed.0" not in layers and isinstance(q2.unet.time_embed[0], nn.Linear)
    assert layers["out.2"].act_quantizer is None and int(layers["out.2"].weight_quantizer.bits[0]) == 8
    skip = layers["output_blocks.0.0.skip_connection"]
    assert skip.split > 0 and skip.act_quantizer_split.n_bits == 6
    assert layers["input_blocks.1.0.in_layers.2"].act_quantizer.n_bits == 4
    assert q2.state_dict().keys() == q.state_dict().keys()


def test_policy_errors():
    with pytest.raises(UserError, match="neither a CompVis UNetModel nor a DDIM Model"):
        quantize_(nn.Sequential(nn.Linear(2, 2)), make_config("qdiffusion"), [1])
    unet, _ = _meta_unet("digits-ldm-vq-4")
    with pytest.raises(UserError, match="no Conv2d/Linear layer named 'nope'"):
        resolve(unet, [{"match": "nope", "set": {}, "required": True}], "compvis_unet")
    with pytest.raises(ValueError, match="no structural split point"):
        resolve(unet, [{"match": "out.2", "set": {"split": True}}], "compvis_unet")
    assert all(isinstance(m, QuantLayer) is False for m in unet.modules())
