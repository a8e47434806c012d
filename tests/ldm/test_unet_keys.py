"""Full-size UNets of the six official configs, built on the meta device: state-dict keys/order/shapes,
parameter counts and the attention head layout must equal those of the original code (reference/ldm/configs)."""
import pytest
import torch
import torch.nn as nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, QKVAttentionLegacy, ResBlock, UNetModel

from refdata import load_json

CONFIGS = ["cin256-v2", "lsun_bedrooms-ldm-vq-4", "celebahq-ldm-vq-4", "ffhq-ldm-vq-4", "lsun_churches-ldm-kl-8",
           "sd-v1-inference"]
PREFIX = "model.diffusion_model."


def _build(name):
    params = load_json(f"configs/{name}.hparams.json")["config"]["model"]["params"]["unet_config"]["params"]
    with torch.device("meta"):
        return UNetModel(**params)


@pytest.fixture(scope="module", params=CONFIGS)
def built(request):
    name = request.param
    return name, _build(name), load_json(f"configs/{name}.summary.json")


def test_state_dict_keys_order_shapes(built):
    name, model, _ = built
    ref = [(k[len(PREFIX):], list(v)) for k, v in load_json(f"configs/{name}.state_dict.json").items()
           if k.startswith(PREFIX)]
    mine = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert [k for k, _ in mine] == [k for k, _ in ref]
    assert mine == ref
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


def test_parameter_count_and_attributes(built):
    _, model, summary = built
    assert sum(p.numel() for p in model.parameters()) == summary["parameter_counts"]["model.diffusion_model"]
    attrs = summary["attributes"]
    assert model.num_heads == attrs["unet_num_heads"]
    assert model.num_head_channels == attrs["unet_num_head_channels"]
    assert model.num_heads_upsample == attrs["unet_num_heads_upsample"]
    assert model.use_checkpoint == attrs["unet_use_checkpoint"]
    assert model.predict_codebook_ids == attrs["unet_predict_codebook_ids"]
    assert len(model.input_blocks) == attrs["n_input_blocks"]
    assert len(model.output_blocks) == attrs["n_output_blocks"]


def test_attention_layout(built):
    _, model, summary = built
    found = []
    for path, mod in model.named_modules():
        if isinstance(mod, SpatialTransformer):
            for block in mod.transformer_blocks:
                for attn in (block.attn1, block.attn2):
                    heads = attn.heads
                    assert attn.to_q.out_features % heads == 0
                    found.append({"module": path, "type": "SpatialTransformer", "in_channels": mod.in_channels,
                                  "heads": heads, "dim_head": attn.to_q.out_features // heads,
                                  "inner_dim": attn.to_q.out_features, "depth": len(mod.transformer_blocks),
                                  "context_dim": block.attn2.to_k.in_features, "scale": attn.scale})
                    assert attn.qk_matmul.scale == attn.scale
        elif isinstance(mod, AttentionBlock):
            heads = mod.attention.n_heads
            found.append({"module": path, "type": "AttentionBlock", "channels": mod.channels, "heads": heads,
                          "dim_head": mod.channels // heads, "attention_class": type(mod.attention).__name__})
            assert isinstance(mod.attention, QKVAttentionLegacy)
    # both attn1 and attn2 of a transformer block share heads/dim_head; compare one entry per module
    dedup = list({f["module"]: f for f in found}.values())
    ref = summary["unet_attention_layout"]
    assert [f["module"] for f in dedup] == [r["module"] for r in ref]
    for f, r in zip(dedup, ref):
        for key, val in r.items():
            if key == "scale":
                assert f[key] == pytest.approx(val, rel=1e-12), (f["module"], key)
            else:
                assert f[key] == val, (f["module"], key)


def test_resblock_layout(built):
    _, model, summary = built
    found = []
    for path, mod in model.named_modules():
        if isinstance(mod, ResBlock):
            updown = None
            if mod.updown:
                updown = "up" if type(mod.h_upd).__name__ == "Upsample" else "down"
            skip = "Identity" if isinstance(mod.skip_connection, nn.Identity) else type(mod.skip_connection).__name__
            found.append({"module": path, "in_ch": mod.channels, "out_ch": mod.out_channels, "updown": updown,
                          "skip": skip, "scale_shift": mod.use_scale_shift_norm})
    assert found == summary["unet_resblock_layout"]
