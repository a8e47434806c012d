"""Fixtures: an InceptionV3 with random weights (the real TF-converted file cannot be downloaded here)."""
from unittest import mock

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A weights file in torch-fidelity's format made from the network's own random init.

    Batch-norm running statistics are set from one batch of random images so activations keep unit scale
    through the 90-odd layers (with the default init they shrink to ~1e-8 and every feature looks alike).
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("random", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch sets the running stats exactly
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def random_inception_extractor(random_inception_weights):
    from evaluation.inception import InceptionExtractor

    return InceptionExtractor(random_inception_weights, batch_size=4)
