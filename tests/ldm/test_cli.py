"""ldm.cli validators and ldm.util.resolve_device: bad flags are refused at parse time with one sentence."""
import argparse
import math

import pytest
import torch

from ldm import cli
from ldm.util import UserError, resolve_device


# ---------------------------------------------------------------------------------------------- devices
class _FakeCuda:
    """torch.cuda of a machine with `count` GPUs whose current device is `current`; set_device validates its
    argument exactly like the real one (an index is required) and records it."""

    def __init__(self, monkeypatch, count=2, current=1):
        self.current, self.calls = current, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)

    def set_device(self, device):
        # the real check: torch.device("cuda") without an index raises "Expected a torch.device with a
        # specified index or an integer" (the crash of `--device cuda`)
        index = torch.cuda._utils._get_device_index(device)
        self.calls.append(index)
        self.current = index


def test_cuda_without_index_is_the_current_device(monkeypatch):
    fake = _FakeCuda(monkeypatch, count=2, current=1)
    with pytest.raises(ValueError, match="specified index"):  # the old code path: set_device(device("cuda"))
        fake.set_device(torch.device("cuda"))
    assert resolve_device("cuda") == torch.device("cuda", 1) and fake.calls == [1]
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and fake.calls == [1, 0]
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_default_device_follows_local_rank(monkeypatch):
    fake = _FakeCuda(monkeypatch, count=2, current=0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == torch.device("cuda", 1) and fake.calls == [1]
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(UserError, match="LOCAL_RANK asks for CUDA device 5, but this machine has 2"):
        resolve_device(None)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("") == torch.device("cuda", 0)


@pytest.mark.parametrize("name, fragment", [("cuda:2", "has 2"), ("cuda:99", "has 2"), ("cuda:x", "not a device"),
                                            ("tpu", "not supported"), ("gpu", "not supported"),
                                            ("cpu:1", "not supported")])
def test_unusable_devices_are_one_sentence(monkeypatch, name, fragment):
    _FakeCuda(monkeypatch, count=2)
    with pytest.raises(UserError, match=fragment) as err:
        resolve_device(name)
    assert "\n" not in str(err.value)


def test_without_cuda(monkeypatch):
    _FakeCuda(monkeypatch, count=0)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="MPS is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


def test_the_real_device_of_this_machine(test_device):
    """On a CUDA machine (MPQDM_TEST_DEVICE=cuda) this runs the real set_device with the resolved index."""
    resolved = resolve_device(test_device.type)
    assert resolved.type == test_device.type
    if resolved.type == "cuda":
        assert resolved.index == torch.cuda.current_device()
        assert torch.zeros(1, device=resolved).device == resolved


# ------------------------------------------------------------------------------------------- validators
def _parse(validator, text, capsys):
    p = cli.ArgumentParser(prog="prog")
    p.add_argument("--x", type=validator)
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args([f"--x={text}"])  # "=" form: argparse reads a bare "-1e-9" as an option
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument --x:") and "usage" not in err
    return lines[0]


@pytest.mark.parametrize("validator, bad", [
    (cli.positive_int, ["0", "-2", "1.5", "nan", "x", ""]),
    (cli.nonneg_int, ["-1", "2.0", "inf"]),
    (cli.finite_float, ["nan", "inf", "-inf", "x", "1e999"]),
    (cli.positive_float, ["0", "-1", "nan", "-0.0"]),
    (cli.nonneg_float, ["-1e-9", "nan", "inf"]),
    (cli.probability, ["-0.1", "1.01", "nan"]),
    (cli.int_in(1, 1000), ["0", "1001", "3.5"]),
    (cli.float_in(0.0, 2.0), ["-0.5", "2.5", "nan"]),
    (cli.device, ["tpu", "cuda:x", "cuda:99999"]),
])
def test_bad_values_are_refused_with_one_line(validator, bad, capsys):
    for text in bad:
        if validator is cli.device and text == "cuda:99999" and torch.cuda.device_count() > 99999:
            continue
        line = _parse(validator, text, capsys)
        assert repr(text) in line or text in line


@pytest.mark.parametrize("validator, text, value", [
    (cli.positive_int, "3", 3), (cli.nonneg_int, "0", 0), (cli.finite_float, "-2.5", -2.5),
    (cli.positive_float, "1e-3", 1e-3), (cli.nonneg_float, "0", 0.0), (cli.probability, "1", 1.0),
    (cli.int_in(1, 1000), "1000", 1000), (cli.float_in(0.0, 2.0), "0", 0.0), (cli.device, "cpu", "cpu"),
])
def test_good_values_pass(validator, text, value):
    assert validator(text) == value


def test_bounds_are_introspectable():
    assert cli.int_in(2, 8).bounds == (2, 8) and cli.float_in(0.0, 1.5).bounds == (0.0, 1.5)
    assert all(callable(v) for v in cli.VALIDATORS)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive_float(str(math.nan))


@pytest.mark.parametrize("argv", [["--x=--"], ["--many=--"]])
def test_a_bare_double_dash_value_is_refused(argv, capsys):
    """argparse (3.11) drops a `--` value without calling type=, leaving [] where a number belongs."""
    p = cli.ArgumentParser(prog="prog")
    p.add_argument("--x", type=cli.positive_int)
    p.add_argument("--many", type=cli.nonneg_int, nargs="+")
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert p.parse_args(["--x=3", "--many", "0", "2"]).many == [0, 2]
