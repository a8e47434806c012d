"""scripts/txt2img.py on a randomly initialised digits-txt2img model (plumbing, not quality): outputs, the per-image
noise rule and guidance wiring against a direct sampler call, resume, truncation, user errors; txt2img and
04 --fp give bit-identical images (the one loop); a sharded torchrun run equals the single-process run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("transformers", reason="transformers not installed (optional [clip] extra)")

from ldm.util import UserError, atomic_save, instantiate_from_config  # noqa: E402
from script_runner import load_script  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "stable-diffusion", "digits-txt2img.yaml")
SCRIPT = os.path.join(ROOT, "scripts", "txt2img.py")
S04 = os.path.join(ROOT, "quant_scripts", "04_sample_lora_model.py")
PROMPTS = ["a handwritten seven", "the digit 3"]


def _script():
    return load_script("scripts/txt2img.py")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(CONFIG).model)
    path = str(tmp_path_factory.mktemp("t2i") / "random.ckpt")
    atomic_save({"state_dict": model.state_dict(), "global_step": 0}, path)
    return path


def _args(ckpt, outdir, *extra):
    return ["--config", CONFIG, "--ckpt", ckpt, "--outdir", str(outdir), "--ddim_steps", "4", "--scale", "3",
            "--n_samples", "2", "--batch_size", "3", "--seed", "5", "--no_progress", "--device", "cpu"] + list(extra)


def _arrays(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_outputs_noise_rule_and_resume(ckpt, tmp_path, monkeypatch):
    from PIL import Image

    import ldm.generate as generate
    from ldm.models.diffusion.plms import PLMSSampler
    from ldm.util import load_model_from_config

    t2i = _script()
    args = _args(ckpt, tmp_path, *sum((["--prompt", p] for p in PROMPTS), []))
    out = t2i.main(args)
    arrays = _arrays(out)
    images, meta = arrays["arr_0"], json.loads(str(arrays["meta"]))
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    image_prompts = [p for p in PROMPTS for _ in range(2)]
    assert arrays["prompts"].tolist() == image_prompts  # index order: image i has prompt i
    assert arrays["arr_1"].tolist() == [7, 7, 3, 3]  # digits phrasings: labels for prompt accuracy
    assert open(tmp_path / "prompts.txt").read().splitlines() == image_prompts
    for i in range(4):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "samples" / f"{i:05d}.png")), images[i])
    assert (meta["sampler"], meta["ddim_steps"], meta["scale"], meta["batch_size"]) == ("plms", 4, 3.0, 3)
    assert meta["truncated_images"] == [] and meta["unconditional_prompt"] == "" and meta["order"] == "index"

    # the first batch (images 0-2) again, straight from the sampler, noise drawn by the documented rule
    model = load_model_from_config(OmegaConf.load(CONFIG), ckpt)
    x_T = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5 * 1000003 + i))
                       for i in range(3)])
    with torch.no_grad():
        c = model.get_learned_conditioning(image_prompts[:3])
        uc = model.get_learned_conditioning(["", "", ""])
        z, _ = PLMSSampler(model).sample(S=4, batch_size=3, shape=[4, 8, 8], conditioning=c, x_T=x_T,
                                         unconditional_guidance_scale=3.0, unconditional_conditioning=uc,
                                         verbose=False, progress=False)
        x = model.decode_first_stage(z)
    expected = torch.round(torch.clamp((x + 1) / 2, 0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images[:3], expected)

    # rerun: the finished file is found, nothing is sampled; other settings are refused
    monkeypatch.setattr(generate, "_sample_batch", lambda *a, **k: pytest.fail("resampled a finished file"))
    assert np.array_equal(_arrays(t2i.main(args))["arr_0"], images)
    with pytest.raises(UserError, match="different settings"):
        t2i.main(args + ["--ddim_steps", "5"])


def test_prompt_file_selection_and_truncation(ckpt, tmp_path):
    t2i = _script()
    long_prompt = " ".join(["seven"] * 90)
    src = tmp_path / "prompts.txt"
    src.write_text("a cat on a mat\n\n" + long_prompt + "\nthe digit 3\n")
    out = t2i.main(_args(ckpt, tmp_path / "o", "--from-file", str(src), "--n_prompts", "2", "--prompt_seed", "1",
                         "--n_samples", "1", "--sampler", "ddim", "--ddim_steps", "2"))
    arrays = _arrays(out)
    meta = json.loads(str(arrays["meta"]))
    chosen = np.random.default_rng(1).permutation(3)[:2].tolist()
    lines = ["a cat on a mat", long_prompt, "the digit 3"]
    assert arrays["prompts"].tolist() == [lines[i] for i in chosen]
    assert meta["prompt_selection"]["seed"] == 1 and meta["prompt_selection"]["n"] == 2
    assert meta["truncated_images"] == [k for k, i in enumerate(chosen) if i == 1]  # truncated, no exception
    assert "arr_1" not in arrays  # not every prompt is a digits phrasing: no labels


@pytest.mark.parametrize("extra,fragment", [
    (["--from-file", "missing_prompts.txt"], "does not exist"),
    (["--prompt", "a", "--sampler", "plms", "--eta", "0.5"], "needs eta 0"),
    ([], "--prompt or with --from-file"),
])
def test_user_errors(ckpt, tmp_path, extra, fragment):
    with pytest.raises(UserError, match=fragment):
        _script().main(_args(ckpt, tmp_path, *extra))


@pytest.mark.parametrize("content,fragment", [(json.dumps({"images": []}), "annotations"), ("", "holds no prompts")])
def test_cli_error_is_one_sentence_with_status_2(tmp_path, content, fragment):
    bad = tmp_path / ("captions.json" if content else "empty.txt")
    bad.write_text(content)
    proc = subprocess.run([sys.executable, SCRIPT, "--preset", "digits-txt2img", "--from-file", str(bad),
                           "--outdir", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_txt2img_and_04_at_fp_are_bit_identical(ckpt, tmp_path):
    """The same prompts and seed through scripts/txt2img.py and through 04 --fp (the FP UNet behind a no-op
    quantized wrapper, swapped in like a quantized model): the same loop, so the same bytes."""
    fp = _script().main(_args(ckpt, tmp_path / "t2i", "--from-file", "digits-heldout", "--n_prompts", "3",
                              "--prompt_seed", "2"))
    q = load_script("quant_scripts/04_sample_lora_model.py").main(
        ["--preset", "digits-txt2img", "--config", CONFIG, "--ckpt", ckpt, "--device", "cpu", "--threads", "1",
         "--run_dir", str(tmp_path / "run"), "--no_progress", "--fp", "--prompts", "digits-heldout", "--n_prompts",
         "3", "--prompt_seed", "2", "--images_per_prompt", "2", "--batch_size", "3", "--ddim_steps", "4",
         "--scale", "3", "--seed", "5"])
    a, b = _arrays(fp), _arrays(q)
    assert a["arr_0"].shape == (6, 32, 32, 3)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["prompts"].tolist() == b["prompts"].tolist()
    assert np.array_equal(a["arr_1"], b["arr_1"])
    meta = json.loads(str(b["meta"]))
    assert meta["quant_stage"] == "fp" and meta["calibration_overlap"] == 0
    assert sorted(os.listdir(tmp_path / "run" / "samples_png")) == [f"{i:05d}.png" for i in range(6)]


@pytest.mark.slow
def test_sharded_torchrun_run_equals_single_process(ckpt, tmp_path):
    """04 on a text model under torchrun with 2 processes (3 shards between them) writes the same file as one
    process."""
    common = [S04, "--preset", "digits-txt2img", "--config", CONFIG, "--ckpt", ckpt, "--device", "cpu",
              "--no_progress", "--fp", "--n_prompts", "3", "--images_per_prompt", "2", "--batch_size", "2",
              "--shard_size", "2", "--ddim_steps", "2", "--seed", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable] + common + ["--run_dir", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=600, env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                         + common + ["--run_dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _arrays(tmp_path / "one" / "samples.npz"), _arrays(tmp_path / "two" / "samples.npz")
    assert set(a) == set(b) == {"arr_0", "arr_1", "prompts", "meta"}
    for k in a:
        assert np.array_equal(a[k], b[k]), k
