import pytest
import torch

from refdata import ref_dir, require

VECTORS = f"{ref_dir()}/vectors/"


def _tiny_cin():
    d = torch.load(require(ref_dir() / "vectors" / "a_unet_cin_tiny.pt"), weights_only=True)
    sd = {}
    for f in d["weights_files"]:
        sd.update(torch.load(VECTORS + f, weights_only=True)["state_dict"])
    return d["config"], sd


@pytest.fixture(scope="session")
def tiny_cin():
    """(build_fn, config): build_fn() returns a fresh eval-mode tiny cin UNet with the reference weights."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    config, sd = _tiny_cin()

    def build():
        u = UNetModel(**config)
        u.load_state_dict(sd)
        return u.eval()
    return build, config
