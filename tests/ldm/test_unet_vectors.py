"""Tiny UNets built from the reference configs, loaded with the reference weights, must reproduce the original
code's outputs: timestep embedding, time_embed output, every input/middle/output block and the final output."""
import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding

from refdata import load_vector

VECTORS = ["a_unet_cin_tiny", "a2_unet_sd_tiny", "b_unet_bedrooms_tiny", "b2_unet_churches_tiny"]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", VECTORS)
def test_tiny_unet_matches_reference(name):
    record, state = load_vector(name)
    model = UNetModel(**record["config"])
    assert list(model.state_dict().keys()) == list(state.keys())  # merged order is the module's order
    model.load_state_dict(state, strict=True)
    model.eval()
    assert sum(p.numel() for p in model.parameters()) == record["num_params"]

    captured = {}
    handles = [model.get_submodule(path).register_forward_hook(
        lambda _m, _i, out, path=path: captured.__setitem__(path, out)) for path in record["intermediates"]]
    inputs = record["inputs"]
    with torch.no_grad():
        out = model(inputs["x"], timesteps=inputs["timesteps"], context=inputs["context"])
        t_emb = timestep_embedding(inputs["timesteps"], model.model_channels)
        emb = model.time_embed(t_emb)
    for h in handles:
        h.remove()

    torch.testing.assert_close(t_emb, record["t_emb"], **TOL)
    torch.testing.assert_close(emb, record["emb"], **TOL)
    assert list(captured) == list(record["intermediates"])
    for path, ref in record["intermediates"].items():
        torch.testing.assert_close(captured[path], ref, **TOL, msg=lambda m, path=path: f"{path}: {m}")
    torch.testing.assert_close(out, record["output"], **TOL)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 17, 803])
    emb = timestep_embedding(t, 6)
    freqs = 10000.0 ** (-torch.arange(3, dtype=torch.float64) / 3)
    args = t[:, None].double() * freqs
    torch.testing.assert_close(emb.double(), torch.cat([args.cos(), args.sin()], dim=1), rtol=0, atol=1e-4)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.equal(odd[:, :6], emb) and torch.all(odd[:, 6] == 0)


def test_class_conditional_label_embedding_is_added():
    cfg = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[],
               num_res_blocks=1, channel_mult=[1], num_heads=1)
    torch.manual_seed(0)
    plain = UNetModel(**cfg).eval()
    with torch.no_grad():
        for p in plain.parameters():  # undo zero-init so the label path reaches the output
            p.normal_(0, 0.2)
    cond = UNetModel(**cfg, num_classes=5).eval()
    state = dict(plain.state_dict(), **{"label_emb.weight": torch.zeros(5, 128)})
    cond.load_state_dict(state, strict=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 500]), torch.tensor([0, 4])
    with torch.no_grad():
        # a zero label embedding leaves the unconditional computation unchanged
        torch.testing.assert_close(cond(x, t, y=y), plain(x, t), rtol=0, atol=0)
        cond.label_emb.weight.normal_()
        assert not torch.allclose(cond(x, t, y=y), plain(x, t))
    with pytest.raises(AssertionError):
        cond(x, t)
