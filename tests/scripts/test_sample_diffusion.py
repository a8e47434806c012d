"""generate_samples and scripts/sample_diffusion.py end to end on the shipped digits model: ADM file layout,
balanced classes, resumable shards (byte-identical after an interruption), one vs two processes, CLI errors."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldm.generate import balanced_labels, generate_samples, grid_path_for, initial_noise, read_npz_meta
from ldm.presets import REPO_ROOT, get_preset, load_preset_model
from ldm.util import UserError

SCRIPT = os.path.join(REPO_ROOT, "scripts", "sample_diffusion.py")
HAVE_CKPT = os.path.isfile(get_preset("digits").ckpt_path)
needs_ckpt = pytest.mark.skipif(not HAVE_CKPT, reason="digits checkpoint not trained yet")
FAST = dict(ddim_steps=4, scale=3.0, seed=7, progress=False)  # few steps: these tests check plumbing




@pytest.fixture(scope="module")
def model():
    return load_preset_model("digits", "cpu")


def _arrays(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _run(args, **env):
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


def test_balanced_labels_and_per_image_noise():
    labels = balanced_labels(25, range(10))
    assert np.bincount(labels, minlength=10).tolist() == [3, 2, 3, 2, 3, 2, 3, 2, 3, 2]
    assert (np.diff(labels) >= 0).all()  # class-major before the shuffle
    # x_T of image i does not depend on which other images share its batch
    both = initial_noise(3, [5, 9], (3, 8, 8))
    alone = initial_noise(3, [9], (3, 8, 8))
    expected = torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(3 * 1_000_003 + 9))
    assert torch.equal(both[1], alone[0]) and torch.equal(alone[0], expected)


@needs_ckpt
def test_adm_layout_balanced_and_shuffled(model, tmp_path):
    out = str(tmp_path / "s.npz")
    assert generate_samples(model, out, n_samples=20, batch_size=10, eta=0.0, **FAST) == out
    data = _arrays(out)
    assert data["arr_0"].shape == (20, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].dtype == np.int64 and np.bincount(data["arr_1"]).tolist() == [2] * 10
    meta = json.loads(str(data["meta"]))
    assert meta["permutation_seed"] == 7 and meta["order"] == "shuffled" and meta["timesteps"] == [1, 251, 501, 751]
    perm = np.random.default_rng(7).permutation(20)
    assert np.array_equal(data["arr_1"], balanced_labels(20, range(10))[perm])
    assert not os.path.exists(out + ".shards")  # merged, shards removed
    from PIL import Image
    assert Image.open(grid_path_for(out)).size == (2 * 32, 10 * 32)  # one row per class
    # a second call with the same arguments finds the finished file; other arguments are refused
    assert generate_samples(model, out, n_samples=20, batch_size=10, eta=0.0, **FAST) == out
    with pytest.raises(UserError, match="already exists with different settings"):
        generate_samples(model, out, n_samples=20, batch_size=10, eta=0.5, **FAST)


@needs_ckpt
def test_interrupted_run_resumes_byte_identical(model, tmp_path):
    kw = dict(n_samples=20, batch_size=5, shard_size=5, eta=0.5, **FAST)  # eta > 0: per-shard step noise too
    whole = generate_samples(model, str(tmp_path / "a.npz"), **kw)
    resumed = str(tmp_path / "b.npz")
    assert generate_samples(model, resumed, max_shards=2, **kw) is None  # "killed" after 2 of 4 shards
    assert sorted(os.listdir(resumed + ".shards")) == [f"shard_0000{k}.{e}" for k in (0, 1) for e in ("json", "npy")]
    with pytest.raises(UserError, match="different arguments"):
        generate_samples(model, resumed, **{**kw, "scale": 2.0})
    assert generate_samples(model, resumed, **kw) == resumed
    with open(whole, "rb") as fa, open(resumed, "rb") as fb:
        assert fa.read() == fb.read()  # arr_0, arr_1 and meta byte for byte
    # deleting the merged file (shards kept) and rerunning rebuilds the same file
    os.remove(resumed)
    generate_samples(model, resumed, keep_shards=True, **kw)
    generate_samples(model, resumed, keep_shards=True, **kw)
    assert np.array_equal(_arrays(resumed)["arr_0"], _arrays(whole)["arr_0"])


@needs_ckpt
def test_samples_do_not_depend_on_batch_size(model, tmp_path):
    a = _arrays(generate_samples(model, str(tmp_path / "a.npz"), n_samples=10, batch_size=10, eta=0.0, **FAST))
    b = _arrays(generate_samples(model, str(tmp_path / "b.npz"), n_samples=10, batch_size=3, eta=0.0, **FAST))
    assert np.array_equal(a["arr_1"], b["arr_1"])
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 2 and (diff == 0).mean() > 0.99  # equal up to float summation order


@needs_ckpt
def test_two_processes_match_one(tmp_path):
    args = [SCRIPT, "--preset", "digits", "--n_samples", "12", "--batch_size", "3", "--ddim_steps", "4",
            "--seed", "1", "--no_progress"]
    one = _run(args + ["--out", str(tmp_path / "one.npz")])
    assert one.returncode == 0, one.stderr
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + args
               + ["--out", str(tmp_path / "two.npz")])
    assert two.returncode == 0, two.stderr
    a, b = _arrays(tmp_path / "one.npz"), _arrays(tmp_path / "two.npz")
    assert set(a) == set(b) == {"arr_0", "arr_1", "meta"}
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert read_npz_meta(tmp_path / "two.npz")["n_samples"] == 12


@pytest.mark.parametrize("args, needle", [
    (["--preset", "nonexistent"], "invalid choice"),
    (["--config", "configs/latent-diffusion/digits-ldm-vq-4.yaml", "--ckpt", "/nonexistent/model.ckpt"],
     "/nonexistent/model.ckpt"),
])
def test_user_errors_exit_2_with_one_sentence(args, needle, tmp_path):
    res = _run([SCRIPT, *args, "--out", str(tmp_path / "x.npz")])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr


def test_help_explains_every_flag():
    spec = importlib.util.spec_from_file_location("sample_diffusion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exc:
        module.parse_args(["--help"])
    assert exc.value.code == 0
    assert all(action.help for action in module.build_parser()._actions)


@pytest.mark.parametrize("kwargs, fragment", [(dict(max_shards=0), "max_shards"), (dict(max_shards=-1), "max_shards"),
                                              (dict(shard_size=0), "shard_size")])
def test_shard_limits_must_be_positive(kwargs, fragment, tmp_path):
    """--max_shards -1 used to mean "all but the last" (a list slice); it is "at most this many new shards"."""
    with pytest.raises(UserError, match=fragment):
        generate_samples(None, str(tmp_path / "x.npz"), n_samples=4, batch_size=2, **kwargs)  # before any model use
    assert os.listdir(tmp_path) == []


def test_uniform_schedule_fits_or_says_which_steps_do():
    from ldm.generate import uniform_schedule
    assert uniform_schedule(20, 1000) == list(range(1, 1000, 50))
    assert uniform_schedule(7, 1000)[-1] == 995  # 8 steps, as the original's range(0, T, T // S)
    for bad in (0, 3, 999, 1000, 2000):
        with pytest.raises(UserError, match="does not fit the 1000-step schedule"):
            uniform_schedule(bad, 1000, "--ddim_steps")
