"""Official checkpoint format (a bare torch.save(model.state_dict())) loads strictly and safely."""
import os
from collections import OrderedDict

import pytest
import torch

from ddim.checkpoint import (CIFAR10_EMA_CKPT, CIFAR10_NONEMA_CKPT, OFFICIAL_CHECKPOINTS, REPO_ROOT,
                             load_model_weights)
from ddim.config import model_config
from ddim.models.diffusion import Model
from ldm.util import UserError

TINY = dict(type="simple", in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16],
            dropout=0.1, var_type="fixedlarge", ema_rate=0.9999, ema=True, resamp_with_conv=True)


def _tiny(seed):
    torch.manual_seed(seed)
    return Model(model_config(TINY, 32)).eval()


def test_bare_state_dict_loads_strictly(tmp_path):
    source = _tiny(0)
    path = tmp_path / "model-790000.ckpt"
    torch.save(source.state_dict(), path)  # exactly how the official files were written
    target = _tiny(1)
    assert not torch.equal(target.conv_in.weight, source.conv_in.weight)
    container = load_model_weights(target, path)
    assert list(container["state_dict"]) == list(source.state_dict())
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10.0])
    with torch.no_grad():
        assert torch.equal(source(x, t), target(x, t))


def test_container_with_state_dict_loads(tmp_path):
    source = _tiny(0)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": source.state_dict(), "training": {"seed": 0, "seconds": 1.5}}, path)
    container = load_model_weights(_tiny(1), path)
    assert container["training"] == {"seed": 0, "seconds": 1.5}


@pytest.mark.parametrize("edit", ["drop", "extra", "prefix", "shape"])
def test_mismatch_is_one_user_error(tmp_path, edit):
    sd = OrderedDict(_tiny(0).state_dict())
    if edit == "drop":
        del sd["conv_out.bias"]
    elif edit == "extra":
        sd["logvar"] = torch.zeros(1000)
    elif edit == "prefix":  # a DataParallel training snapshot is not the official format
        sd = OrderedDict(("module." + k, v) for k, v in sd.items())
    else:
        sd["conv_in.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.ckpt"
    torch.save(sd, path)
    with pytest.raises(UserError) as err:
        load_model_weights(_tiny(1), path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and message.count(". ") == 0


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model-790000.ckpt"
    sd = OrderedDict(_tiny(0).state_dict())
    sd["conv_in.weight"] = _RunsCommand(marker)
    torch.save(sd, path)
    with pytest.raises(UserError):
        load_model_weights(_tiny(1), path)
    assert not marker.exists()
    torch.save(_RunsCommand(marker), path)  # the whole file a reduce payload
    with pytest.raises(UserError):
        load_model_weights(_tiny(1), path)
    assert not marker.exists()


def test_missing_official_file_names_the_download_command(tmp_path):
    for path, name in ((CIFAR10_EMA_CKPT, "cifar10"), (CIFAR10_NONEMA_CKPT, "cifar10-nonema"),
                       (tmp_path / "cifar10" / "model-790000.ckpt", "cifar10")):
        if os.path.exists(path):
            continue  # downloaded on this machine
        with pytest.raises(UserError) as err:
            load_model_weights(_tiny(0), path)
        assert f"`bash scripts/download_models.sh {name}`" in str(err.value)
    with pytest.raises(UserError, match="not found"):
        load_model_weights(_tiny(0), tmp_path / "elsewhere.pt")


def test_download_script_matches_the_official_table():
    with open(os.path.join(REPO_ROOT, "scripts", "download_models.sh")) as fh:
        script = fh.read()
    for name, (url, md5, path) in OFFICIAL_CHECKPOINTS.items():
        assert url in script and md5 in script and path in script, name
