"""Property-based CLI contract of every script: a bad input ends with one sentence and exit status 2, writing nothing.

The scripts are driven by introspection, not by a hand-written list of flags: for each script in SCRIPTS its
parser is built, and every option whose ``type`` is an ldm.cli validator gets generated values that validator must
refuse (negatives, zero where positive, NaN/inf, out-of-range, non-numbers); every option with ``choices`` gets a
value outside them. Scripts that read run_dir artifacts also get corrupt ones (truncated, flipped bytes, wrong
stage, missing payload, wrong-shape tensor, stale parent, older format). Each case calls ``main(argv)`` in this
process and asserts exit status 2, exactly one stderr line starting with "error:", no traceback, and an unchanged
run_dir (paths, mtimes and hashes).

A new script is covered by one more line in SCRIPTS: its path, the arguments that make a minimal valid call ({run} is the run dir), and the artifacts it reads.
"""
import dataclasses
import math
import os
import shutil
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from script_runner import assert_one_sentence, load_script, run_main, snapshot
from ldm import cli

pytestmark = pytest.mark.slow  # builds the golden run once (~30 s on 2 cores), then ~1 min of cases


@dataclasses.dataclass(frozen=True)
class Script:
    path: str
    argv: tuple                 # a minimal valid call; "{run}" is replaced by the run dir
    consumes: tuple = ()        # run_dir artifacts it reads (corrupted one at a time)
    builder: str = "build_parser"

    def args(self, run):
        return [a.replace("{run}", str(run)) for a in self.argv]


RUN = ("--preset", "digits", "--device", "cpu", "--run_dir", "{run}", "--no_progress", "--threads", "1")
SCRIPTS = [
    Script("quant_scripts/01_collect_input_4_calib.py", RUN + ("--calib_steps", "4", "--calib_batch", "1")),
    Script("quant_scripts/02_quantize_ldm_naive.py", RUN + ("--n_calib", "8", "--train_steps", "4"), ("calib",)),
    Script("quant_scripts/02_quantize_ldm_naive.py", RUN + ("--method", "qdiffusion", "--cali_st", "2", "--cali_n",
                                                            "2", "--weight_iters", "1", "--act_iters", "1"), ("calib",)),
    Script("quant_scripts/02_quantize_ldm_naive.py", RUN + ("--method", "edadm", "--tdac_n", "1", "--weight_iters", "1",
                                                            "--running_batch", "4"), ("calib",)),
    Script("quant_scripts/03_train_mpqdm.py", RUN + ("--epochs", "1", "--batch_size", "1"), ("naive",)),
    Script("quant_scripts/04_sample_lora_model.py", RUN + ("--n_samples", "2", "--batch_size", "2"), ("finetuned",)),
    Script("quant_scripts/04_sample_lora_model.py", RUN + ("--stage", "naive", "--n_samples", "2"), ("naive",)),
    Script("quant_scripts/05_evaluate.py", ("digits-train", "{run}/samples.npz", "--extractor", "digits",
                                            "--out", "{run}/m.json", "--no-progress"), ("samples",)),
    Script("quant_scripts/06_export_packed.py", RUN, ("finetuned",)),
    Script("scripts/sample_diffusion.py", ("--preset", "digits", "--device", "cpu", "--out", "{run}/fp.npz",
                                           "--n_samples", "2", "--no_progress")),
    Script("quant_scripts/07_deploy.py", RUN),   # flags only: its artifact checks need the optional engine
    Script("scripts/txt2img.py", ("--preset", "digits-txt2img", "--prompt", "a handwritten seven", "--outdir",
                                  "{run}/t2i", "--ddim_steps", "2", "--device", "cpu", "--no_progress")),
]
SCRIPT_IDS = [f"{os.path.basename(s.path)}{'-' + s.consumes[0] if s.consumes else ''}"
              f"{'-' + s.argv[s.argv.index('--method') + 1] if '--method' in s.argv else ''}" for s in SCRIPTS]
EXAMPLES = 4  # generated values per flag: the validators are simple, breadth over the flags matters more

# ------------------------------------------------------------------------------------ bad values per validator
_NON_NUMBERS = st.sampled_from(["", "x", "abc", "1.2.3", "0x10", "1,5", "--", "one"])
_NON_FINITE = st.sampled_from(["nan", "-nan", "inf", "-inf", "1e999", "-1e999", "NaN", "Infinity"])
_NON_INTEGERS = st.one_of(_NON_NUMBERS, _NON_FINITE, st.floats(allow_nan=False, allow_infinity=False).map(repr))


def _floats_outside(lo, hi):
    below = st.floats(max_value=lo, exclude_max=True, allow_infinity=False) if lo is not None else st.nothing()
    above = st.floats(min_value=hi, exclude_min=True, allow_infinity=False) if hi is not None else st.nothing()
    return st.one_of(below.map(repr), above.map(repr), _NON_FINITE, _NON_NUMBERS)


def _ints_outside(lo, hi):
    below = st.integers(max_value=lo - 1) if lo is not None else st.nothing()
    above = st.integers(min_value=hi + 1) if hi is not None else st.nothing()
    return st.one_of(below.map(str), above.map(str), _NON_INTEGERS)


def _bad_devices():
    names = ["tpu", "gpu", "cuda:x", "cuda:-1", "cpu:3", "mps:1", f"cuda:{torch.cuda.device_count() + 7}"]
    if not torch.cuda.is_available():
        names += ["cuda", "cuda:0"]
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        names.append("mps")
    return st.sampled_from(names)


def bad_values(validator):
    """Strings the validator must refuse, or None when it is not an ldm.cli validator."""
    fixed = {cli.positive_int: lambda: _ints_outside(1, None), cli.nonneg_int: lambda: _ints_outside(0, None),
             cli.finite_float: lambda: st.one_of(_NON_FINITE, _NON_NUMBERS),
             cli.positive_float: lambda: st.one_of(_floats_outside(0.0, None), st.sampled_from(["0", "-0.0"])),
             cli.nonneg_float: lambda: _floats_outside(0.0, None),
             cli.probability: lambda: _floats_outside(0.0, 1.0), cli.device: _bad_devices}
    if validator in fixed:
        return fixed[validator]()
    bounds = getattr(validator, "bounds", None)
    if bounds is not None and validator.__name__.startswith("int_in"):
        return _ints_outside(*bounds)
    if bounds is not None and validator.__name__.startswith("float_in"):
        return _floats_outside(*bounds)
    return None


def _options(script):
    """The optional arguments of the script's parser (positionals are the call's fixed arguments)."""
    parser = getattr(load_script(script.path), script.builder)()
    return [a for a in parser._actions if a.option_strings]


def flag_cases():
    """(script, option string) of every option with a validator or choices, found by introspection."""
    cases, seen = [], set()
    for script, sid in zip(SCRIPTS, SCRIPT_IDS):
        if script.path in seen:
            continue  # the same parser again (04 listed for each stage it reads)
        seen.add(script.path)
        for action in _options(script):
            if action.type is not None or action.choices is not None:
                cases.append(pytest.param(script, action.option_strings[-1], id=f"{sid}{action.option_strings[-1]}"))
    return cases


def test_every_numeric_flag_has_a_validator():
    """Introspection guard: a flag typed with plain int/float (or any non-validator callable) would let NaN,
    negatives or zero through; every typed option must use an ldm.cli validator."""
    for script in SCRIPTS:
        for action in _options(script):
            if action.type is not None:
                assert bad_values(action.type) is not None, (script.path, action.option_strings, action.type)


def _action(script, option):
    return next(a for a in _options(script) if option in a.option_strings)


@pytest.mark.parametrize("script, option", flag_cases())
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_bad_flag_value_is_one_sentence(script, option, data, golden_run, capsys):
    action = _action(script, option)
    if action.type is not None:
        value = data.draw(bad_values(action.type), label="value")
    else:
        value = data.draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-+0123456789", max_size=12)
                          .filter(lambda v: v not in [str(c) for c in action.choices]), label="choice")
    before = snapshot(golden_run)
    code, _, err = run_main(script.path, script.args(golden_run) + [f"{option}={value}"], capsys)
    line = assert_one_sentence(code, err)
    assert option in line, line
    assert snapshot(golden_run) == before


# ------------------------------------------------------------------------------------------ corrupt artifacts
FILES = {"calib": "calib.pt", "naive": "naive.pt", "finetuned": "finetuned.pt", "samples": "samples.npz"}
UPSTREAM = {"naive": "calib", "finetuned": "naive"}
WRONG_STAGE = {"calib": "naive", "naive": "finetuned", "finetuned": "naive"}


def _resave(path, edit):
    """Load an artifact, let ``edit(obj)`` change it, and save it with a valid checksum (so that the defect is
    reached past the checksum)."""
    from quant.artifacts import save_artifact

    obj = torch.load(path, map_location="cpu", weights_only=True)
    edit(obj)
    meta = obj.pop("meta")
    save_artifact(path, meta, parent=meta.get("parent"), **obj)


def _tensor_data_ranges(path):
    """(start, end) byte ranges of the tensor storages inside a torch zip file."""
    ranges = []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            if "/data/" in info.filename and info.file_size > 0:
                fh.seek(info.header_offset + 26)
                name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
                start = info.header_offset + 30 + name_len + extra_len
                ranges.append((start, start + info.file_size))
    return ranges


def corrupt(kind, run, stage, data):
    path = run / FILES[stage]
    if kind == "truncated":
        size = path.stat().st_size
        keep = data.draw(st.integers(0, size - 1), label="keep bytes")
        path.write_bytes(path.read_bytes()[:keep])
    elif kind == "flipped":  # inside a tensor's bytes: the zip and pickle still read, only the checksum can tell
        ranges = _tensor_data_ranges(path)
        start, end = data.draw(st.sampled_from(ranges), label="storage")
        offset = data.draw(st.integers(start, end - 1), label="offset")
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        path.write_bytes(bytes(raw))
    elif kind == "wrong_stage":
        shutil.copy2(run / FILES[WRONG_STAGE[stage]], path)
    elif kind == "missing_payload":
        key = "x" if stage == "calib" else "state_dict"
        _resave(path, lambda obj: obj.pop(key))
    elif kind == "wrong_shape":
        def edit(obj):
            if stage == "calib":
                obj["x"] = obj["x"][:, :2]
            else:
                name = data.draw(st.sampled_from(sorted(k for k, v in obj["state_dict"].items() if v.dim() >= 1)),
                                 label="tensor")
                obj["state_dict"][name] = torch.zeros(obj["state_dict"][name].shape[0] + 1)
        _resave(path, edit)
    elif kind == "stale_parent":  # the upstream file was re-made since: its checksum no longer matches
        _resave(run / FILES[UPSTREAM[stage]], lambda obj: obj["meta"].update(remade=True))
    elif kind == "older_format":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        obj["meta"]["format"] = 1
        del obj["meta"]["checksum"]
        torch.save(obj, path)
    else:
        raise ValueError(kind)


KINDS = ("truncated", "flipped", "wrong_stage", "missing_payload", "wrong_shape", "stale_parent", "older_format")


def corrupt_cases():
    cases = []
    for script, sid in zip(SCRIPTS, SCRIPT_IDS):
        for stage in script.consumes:
            kinds = ("truncated",) if stage == "samples" else [k for k in KINDS if k != "stale_parent"
                                                               or stage in UPSTREAM]
            cases += [pytest.param(script, stage, kind, id=f"{sid}-{kind}") for kind in kinds]
    return cases


@pytest.mark.parametrize("script, stage, kind", corrupt_cases())
@settings(max_examples=2, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_corrupt_artifact_is_one_sentence(script, stage, kind, data, golden_run, tmp_path_factory, capsys):
    run = tmp_path_factory.mktemp("corrupt")
    for name in FILES.values():
        shutil.copy2(golden_run / name, run / name)
    corrupt(kind, run, stage, data)
    before = snapshot(run)
    code, _, err = run_main(script.path, script.args(run), capsys)
    line = assert_one_sentence(code, err)
    assert snapshot(run) == before
    if stage != "samples":
        expected = {"truncated": "could not be read", "flipped": "checksum mismatch", "wrong_stage": "artifact, not",
                    "missing_payload": "holds no", "wrong_shape": "", "stale_parent": "stale",
                    "older_format": "older toolkit"}[kind]
        assert expected in line, line
        if kind != "wrong_shape":
            assert "re-run quant_scripts/0" in line, line
    shutil.rmtree(run)


def test_value_strategies_are_refused_by_their_validator():
    """The generators themselves: every value they produce is refused (else a flag test could pass vacuously
    by running a valid command)."""
    import argparse

    for validator in (cli.positive_int, cli.nonneg_int, cli.finite_float, cli.positive_float, cli.nonneg_float,
                      cli.probability, cli.int_in(2, 8), cli.float_in(0.0, 1.0), cli.device):
        @settings(max_examples=30, deadline=None, derandomize=True, database=None)
        @given(value=bad_values(validator))
        def refused(value):
            with pytest.raises(argparse.ArgumentTypeError):
                validator(value)
        refused()
    assert math.isnan(float("nan"))
