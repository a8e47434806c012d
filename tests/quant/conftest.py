import pytest
import torch

VECTORS = "/work/shared/reference/ldm/vectors/"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tests run thousands of tiny ops; intra-op threads only add contention on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_cin():
    d = torch.load(VECTORS + "a_unet_cin_tiny.pt", weights_only=True)
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
