import pytest

from refdata import TINY_CIN_UNET, tiny_cin_unet


@pytest.fixture(scope="session")
def tiny_cin():
    """(build_fn, config): build_fn() returns a fresh eval-mode tiny cin UNet with deterministic weights."""
    return (lambda: tiny_cin_unet(seed=0)), dict(TINY_CIN_UNET)
