import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # the tests run thousands of tiny ops; intra-op threads only add contention on a 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def test_device():
    """The device of the device-sensitive tests (LoRA init, layers, quantizers): $MPQDM_TEST_DEVICE, default cpu.

    benchmarks/gpu_check.sh runs them with MPQDM_TEST_DEVICE=cuda; asking for an absent device fails loudly
    instead of silently testing the CPU again.
    """
    name = os.environ.get("MPQDM_TEST_DEVICE", "cpu")
    from ldm.util import UserError, resolve_device
    try:
        device = resolve_device(name)
    except UserError as err:
        pytest.fail(f"MPQDM_TEST_DEVICE={name}: {err}")
    if device.type == "cuda":  # exact fp32 like the CPU: the tests compare against closed forms at 1e-5..1e-6
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device
