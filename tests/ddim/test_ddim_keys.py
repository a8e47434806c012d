"""State-dict keys of the full-size models (built on the meta device: no memory, fast)."""
import pytest
import torch

from ddim.checkpoint import CIFAR10_CONFIG
from ddim.config import load_config, model_config, namespace2dict
from ddim.models.diffusion import AttnBlock, Model, ResnetBlock
from ddimref import ddim_ref_dir, load_ddim_json


def _meta_model(config):
    with torch.device("meta"):
        return Model(config)


@pytest.mark.parametrize("name", ["cifar10", "lsun_bedroom", "celeba"])
def test_full_size_keys_match_original_exactly(name):
    ref = load_ddim_json("state_dicts.json")[name]
    sd = _meta_model(model_config(ref["model"], ref["image_size"])).state_dict()
    got = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()]
    assert got == ref["keys"]  # names, order, shapes, dtypes
    assert len(sd) == ref["n_tensors"]
    assert sum(v.numel() for v in sd.values()) == ref["n_params"]


def test_cifar10_yaml_is_the_reference_config():
    config = load_config(CIFAR10_CONFIG)
    ref_path = ddim_ref_dir() / "state_dicts.json"
    if ref_path.exists():
        ref = load_ddim_json("state_dicts.json")["cifar10"]
        assert namespace2dict(config.model) == dict(ref["model"])
        assert config.data.image_size == ref["image_size"]
    assert config.data.rescaled is True and config.diffusion.num_diffusion_timesteps == 1000


def test_cifar10_counts_without_shared_folder():
    """Fallback that needs no reference data: the counts of TXT2IMG_CIFAR.md B.1 (measured on the original)."""
    model = _meta_model(load_config(CIFAR10_CONFIG))
    sd = model.state_dict()
    assert len(sd) == 328
    assert sum(v.numel() for v in sd.values()) == 35_746_307
    assert len(list(model.buffers())) == 0
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(torch.nn.Conv2d) == 89 and kinds.count(torch.nn.Linear) == 24
    assert kinds.count(ResnetBlock) == 22 and kinds.count(AttnBlock) == 6
    keys = list(sd)
    assert keys[:4] == ["temb.dense.0.weight", "temb.dense.0.bias", "temb.dense.1.weight", "temb.dense.1.bias"]
    assert keys[-4:] == ["norm_out.weight", "norm_out.bias", "conv_out.weight", "conv_out.bias"]
    # up is stored with index 0 at the highest resolution: up.0 convs have 128 output channels
    assert tuple(sd["up.0.block.0.conv1.weight"].shape) == (128, 384, 3, 3)  # 256 upsampled + 128 skip
    assert tuple(sd["up.0.block.2.conv1.weight"].shape) == (128, 256, 3, 3)  # 128 + conv_in's 128
    assert tuple(sd["up.3.block.0.conv1.weight"].shape) == (256, 512, 3, 3)
    assert "up.0.upsample.conv.weight" not in sd and "up.3.upsample.conv.weight" in sd
    assert [k for k in keys if ".attn." in k and k.endswith("q.weight")] == [
        "down.1.attn.0.q.weight", "down.1.attn.1.q.weight", "up.1.attn.0.q.weight", "up.1.attn.1.q.weight",
        "up.1.attn.2.q.weight"]
    assert sum(k.endswith("nin_shortcut.weight") and k.startswith("up.") for k in keys) == 12


def test_decoder_blocks_expose_the_concatenation_split():
    """Every up ResnetBlock takes cat([h, skip]); h_channels is the split point, in_channels the total."""
    model = _meta_model(load_config(CIFAR10_CONFIG))
    for i, level in enumerate(model.up):
        for block in level.block:
            assert block.h_channels is not None and 0 < block.h_channels < block.in_channels
            assert block.nin_shortcut.in_channels == block.in_channels
    for level in model.down:
        assert all(block.h_channels is None for block in level.block)
    # lowest level, first block: h = mid output (256) + skip (256)
    assert (model.up[3].block[0].h_channels, model.up[3].block[0].in_channels) == (256, 512)
    # highest level, last block: h (128) + conv_in output (128)
    assert (model.up[0].block[2].h_channels, model.up[0].block[2].in_channels) == (128, 256)
