"""The shipped pixel-space digits miniature, and a full-size CIFAR-10 forward on the CPU."""
import os

import pytest
import torch

from ddim.checkpoint import CIFAR10_CONFIG, DIGITS_PIXEL_CKPT, DIGITS_PIXEL_CONFIG
from ddim.config import load_config
from ddim.models.diffusion import AttnBlock, Model
from ddim.pipeline import load_pixel_model


@pytest.mark.skipif(not os.path.isfile(DIGITS_PIXEL_CKPT),
                    reason="the pixel miniature is not trained yet (python scripts/train_digits_pixel.py writes "
                           "models/ddim/digits-pixel/model.ckpt)")
def test_shipped_miniature_loads_and_samples():
    assert os.path.getsize(DIGITS_PIXEL_CKPT) < 6 * 2 ** 20
    model = load_pixel_model(DIGITS_PIXEL_CONFIG, DIGITS_PIXEL_CKPT)
    net = model.model.diffusion_model
    assert isinstance(net, Model) and not net.training
    assert any(isinstance(m, AttnBlock) for m in net.modules())
    assert model.training_record["ema_exported"] is True
    # the weights are the ones its training run wrote (scripts/train_digits_pixel.py reproduces this digest)
    from ldm.training import state_dict_sha256
    raw = torch.load(DIGITS_PIXEL_CKPT, map_location="cpu", weights_only=True)
    assert state_dict_sha256(raw["state_dict"]) == model.training_record["state_dict_sha256"]
    assert net.state_dict().keys() == raw["state_dict"].keys()
    x_T = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = model.sample(x_T, 10, skip_type="uniform", eta=0.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 32, 32) and bool(torch.isfinite(x).all())
    per_image_std = x.flatten(1).std(dim=1)
    assert bool((per_image_std > 0.2).all())  # not constant images
    assert not torch.allclose(x[0], x[1], atol=0.1)  # different noise, different digits
    # digits: near-white strokes on a near-black background in [-1, 1], channels equal like the data
    assert float(x.clamp(-1, 1).mean()) < -0.2
    # the data's channels are equal; the shipped miniature (2,000 steps, a weak model) measures 0.103 here
    assert float((x[:, 0] - x[:, 1]).abs().mean()) < 0.15


def test_full_size_cifar10_forward_on_cpu():
    torch.manual_seed(0)
    model = Model(load_config(CIFAR10_CONFIG)).eval()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([500.0]))
    assert out.shape == (1, 3, 32, 32) and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 64, 64), torch.tensor([1.0]))
