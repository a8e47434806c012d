"""quant_scripts 01 -> 02 -> 03 -> 04 -> 05 on the new model families, tiny settings (4-step schedules, 1 epoch, a
few samples), for EfficientDM and MPQ-DM: the embedded pixel model (digits-pixel; random weights with its config
until its checkpoint is shipped) and the embedded text model (digits-txt2img); the sd-v1-4 preset's code path with
the embedded text model standing in for SD v1.4; the cifar10 preset on a random-weight FULL-SIZE Model (slow)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from script_runner import REPO, load_script

PIXEL_CONFIG = os.path.join(REPO, "configs/ddim/digits-pixel.yml")
PIXEL_CKPT = os.path.join(REPO, "models/ddim/digits-pixel/model.ckpt")
CIFAR_CONFIG = os.path.join(REPO, "configs/ddim/cifar10.yml")
TEXT_CONFIG = os.path.join(REPO, "configs/stable-diffusion/digits-txt2img.yaml")
TEXT_CKPT = os.path.join(REPO, "models/ldm/digits-txt2img/model.ckpt")
TEXT_TOKENIZER = os.path.join(REPO, "models/ldm/digits-txt2img/tokenizer")
QUAD4 = [0, 88, 355, 800]           # timestep_sequence("quad", 4): no repeats at 4 steps
UNIFORM4 = [1, 251, 501, 751]       # the LDMs' uniform DDIM-4 (+1 shift)
METHODS = [("efficientdm", "4", "8"), ("mpqdm", "2", "4")]

pytestmark = pytest.mark.slow  # end-to-end runs (each family ~1 minute on 2 busy cores)


def run(script, *argv):
    return load_script(f"quant_scripts/{script}").main([str(a) for a in argv])


def random_pixel_ckpt(config_path, path, seed=0):
    """A ddim Model with seeded random weights (non-zero everywhere), saved like the shipped miniature."""
    from ddim.config import load_config
    from ddim.models.diffusion import Model
    from ldm.util import atomic_save

    torch.manual_seed(seed)
    model = Model(load_config(config_path))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
    atomic_save({"state_dict": model.state_dict()}, str(path))
    return str(path)


def _arrays(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def finish(run_dir, common, method, w, a, sample_args, ref="digits-train"):
    """02 -> 03 -> 04 -> 05 in run_dir (which holds calib.pt); returns (naive meta, finetuned state, samples)."""
    from quant.artifacts import load_artifact

    run("02_quantize_ldm_naive.py", *common, "--method", method, "--n_bits_w", w, "--n_bits_a", a, "--n_calib", 8,
        "--train_steps", 4, "--lora_rank", 2)
    run("03_train_mpqdm.py", *common, "--epochs", 1, "--batch_size", 2, "--preview_every", 1)
    run("04_sample_lora_model.py", *common, *sample_args)
    load_script("quant_scripts/05_evaluate.py").main([ref, str(run_dir / "samples.npz"), "--extractor", "digits",
                                                      "--no-progress"])
    metrics = json.load(open(run_dir / "samples.metrics.json"))
    tuned = load_artifact(run_dir / "finetuned.pt")
    assert len(list((run_dir / "previews").glob("*.png"))) == 1
    assert any(v.abs().sum() > 0 for k, v in tuned["state_dict"].items() if k.endswith("lora_B"))
    return load_artifact(run_dir / "naive.pt")["meta"], _arrays(run_dir / "samples.npz"), metrics


# ------------------------------------------------------------------------------------------------ pixel
@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    """(model flags, run dir holding calib.pt) of the embedded pixel model, 4-step quad trajectories."""
    from quant.artifacts import load_artifact

    base = tmp_path_factory.mktemp("pixel")
    model = ["--preset", "digits-pixel", "--device", "cpu", "--threads", "1", "--no_progress"]
    if not os.path.isfile(PIXEL_CKPT):
        model += ["--config", PIXEL_CONFIG, "--ckpt", random_pixel_ckpt(PIXEL_CONFIG, base / "random.ckpt")]
    calib_dir = base / "calib"
    run("01_collect_input_4_calib.py", *model, "--run_dir", calib_dir, "--calib_steps", 4, "--calib_batch", 2)
    calib = load_artifact(calib_dir / "calib.pt")
    assert calib["x"].shape == (8, 3, 32, 32) and "context" not in calib and "uncond_context" not in calib
    assert calib["t"].view(4, 2)[:, 0].tolist() == QUAD4[::-1]  # one entry per step, sampling order
    meta = calib["meta"]
    assert (meta["family"], meta["conditioning"], meta["skip_type"]) == ("pixel", "none", "quad")
    assert meta["calib_timesteps"] == QUAD4 and meta["calib_scale"] == 1.0
    return model, calib_dir


@pytest.mark.parametrize("method,w,a", METHODS)
def test_pixel_pipeline(pixel, tmp_path, method, w, a):
    model, calib_dir = pixel
    shutil.copy2(calib_dir / "calib.pt", tmp_path / "calib.pt")
    common = model + ["--run_dir", tmp_path]
    naive, samples, metrics = finish(tmp_path, common, method, w, a, ["--n_samples", 4, "--batch_size", 2])
    assert naive["timesteps"] == QUAD4 and naive["sampling_timesteps"] == QUAD4 and naive["skip_type"] == "quad"
    assert naive["policy"]["family"] == "ddim_model" and naive["method"] == method
    assert samples["arr_0"].shape == (4, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
    assert "arr_1" not in samples and "prompts" not in samples
    meta = json.loads(str(samples["meta"]))
    assert (meta["family"], meta["skip_type"], meta["timesteps"], meta["quant_method"]) == (
        "pixel", "quad", QUAD4, method)
    assert metrics["num_samples"] == 4 and metrics["metrics"]["FID"] is not None


# the post-training peers at tiny budgets on the pixel calib.pt (4 quad steps x 2 trajectories, no guidance)
_PTQ_TINY = ("--weight_batch", 4, "--micro_batch", 4, "--running_batch", 4, "--train_steps", 4)
PIXEL_PTQ = {
    "qdiffusion": ("--cali_st", 2, "--cali_n", 2, "--weight_iters", 2, "--act_iters", 2, "--act_batch", 4,
                   "--act_init_n", 4, *_PTQ_TINY),
    "tfmqdm": ("--cali_st", 2, "--cali_n", 2, "--fsc_n", 2, "--weight_iters", 2, "--tiar_iters", 2, "--tiar_batch", 4,
               "--act_init_n", 4, *_PTQ_TINY),
    "edadm": ("--tdac_n", 2, "--weight_iters", 2, *_PTQ_TINY),
}


@pytest.mark.parametrize("method", sorted(PIXEL_PTQ))
def test_pixel_post_training(pixel, tmp_path, method):
    """Each post-training method runs 02 -> 04 on the pixel family with its ddim_model policy (the digits-pixel
    table's peer rows)."""
    from quant.artifacts import load_artifact

    model, calib_dir = pixel
    shutil.copy2(calib_dir / "calib.pt", tmp_path / "calib.pt")
    common = model + ["--run_dir", tmp_path]
    run("02_quantize_ldm_naive.py", *common, "--method", method, "--n_bits_w", 4, "--n_bits_a", 8,
        *PIXEL_PTQ[method])
    run("04_sample_lora_model.py", *common, "--n_samples", 4, "--batch_size", 2)
    meta = load_artifact(tmp_path / "naive.pt")["meta"]
    assert meta["method"] == method and meta["policy"]["family"] == "ddim_model"
    # cali_st x cali_n rows, or TDAC's N = 2 (one sample per trajectory); no guidance, so one row each
    assert meta["n_calib_rows"] == (2 if method == "edadm" else 2 * 2)
    if method == "edadm":
        assert sum(meta["calib_selection"]["counts"]) == 2 and len(meta["calib_selection"]["counts"]) == 4
    arr = _arrays(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8 and arr.std() > 0


def test_pixel_loop_noise_rule(pixel, tmp_path):
    """The one loop on a pixel model: image i starts from the CPU noise seeded seed*1000003+i, whatever the batch,
    and equals PixelDiffusion.sample (generalized_steps) from that noise."""
    from ldm.generate import generate_samples, initial_noise, to_uint8_nhwc
    from ldm.presets import load_model

    flags = pixel[0]
    ckpt = flags[flags.index("--ckpt") + 1] if "--ckpt" in flags else PIXEL_CKPT
    model = load_model("pixel", PIXEL_CONFIG, ckpt)
    a = _arrays(generate_samples(model, tmp_path / "a.npz", 3, 3, ddim_steps=4, seed=2, skip_type="quad",
                                 progress=False))
    b = _arrays(generate_samples(model, tmp_path / "b.npz", 3, 2, ddim_steps=4, seed=2, skip_type="quad",
                                 progress=False))
    order = np.random.default_rng(2).permutation(3)  # unconditional files are stored shuffled (seeded)
    direct = to_uint8_nhwc(model.sample(initial_noise(2, range(3), [3, 32, 32]), 4, "quad", eta=0.0))
    assert np.array_equal(a["arr_0"], direct[order])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # batch 3 vs 2: summation order


# ------------------------------------------------------------------------------------------------ text
@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """(model flags, run dir holding calib.pt) of the embedded text model: 2 x 2 calibration prompts, PLMS-4."""
    from quant.artifacts import load_artifact

    if not os.path.isfile(TEXT_CKPT):
        pytest.skip("the shipped digits-txt2img checkpoint is missing (scripts/train_digits_txt2img.py)")
    model = ["--preset", "digits-txt2img", "--device", "cpu", "--threads", "1", "--no_progress"]
    calib_dir = tmp_path_factory.mktemp("text")
    run("01_collect_input_4_calib.py", *model, "--run_dir", calib_dir, "--calib_steps", 4, "--calib_batch", 2,
        "--calib_batches", 2)
    calib = load_artifact(calib_dir / "calib.pt")
    meta = calib["meta"]
    assert (meta["sampler"], meta["calib_scale"], meta["conditioning"]) == ("plms", 3.0, "text")
    assert meta["n_entries"] == 8 and meta["rows_per_entry"] == 4  # PLMS's look-ahead call left out
    assert calib["x"].shape == (32, 4, 8, 8) and calib["context"].shape == (32, 77, 64)
    assert calib["t"].view(8, 4)[:4, 0].tolist() == UNIFORM4[::-1]
    uncond = calib["uncond_context"]
    rows = calib["context"].view(8, 4, 77, 64)
    assert torch.equal(rows[:, :2], uncond.expand(8, 2, 77, 64))        # uncond rows first ("" prompt)
    assert not torch.equal(rows[:, 2:], uncond.expand(8, 2, 77, 64))    # then the prompts' contexts
    record = meta["calib_prompts"]
    from ldm.data.prompts import digits_prompt_list
    assert len(record["prompts"]) == 4 and set(record["prompts"]) <= set(digits_prompt_list())
    assert record["overlap_with_evaluation"] == 0 and record["evaluation"]["source"] == "digits-heldout"
    return model, calib_dir


@pytest.mark.parametrize("method,w,a", METHODS)
def test_text_pipeline(text, tmp_path, method, w, a):
    model, calib_dir = text
    shutil.copy2(calib_dir / "calib.pt", tmp_path / "calib.pt")
    common = model + ["--run_dir", tmp_path]
    naive, samples, metrics = finish(tmp_path, common, method, w, a, ["--n_prompts", 3, "--images_per_prompt", 2,
                                                                      "--batch_size", 4])
    assert naive["timesteps"] == UNIFORM4 and naive["calib_prompts"]["prompts"]
    assert samples["arr_0"].shape == (6, 32, 32, 3)
    prompts = samples["prompts"].tolist()
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and len(set(prompts)) == 3
    from ldm.data.prompts import digit_labels, digits_prompt_list
    assert set(prompts) <= set(digits_prompt_list(heldout=True))
    assert samples["arr_1"].tolist() == digit_labels(prompts).tolist()
    assert "prompt_accuracy" in metrics["metrics"]
    assert len(os.listdir(tmp_path / "samples_png")) == 6
    assert open(tmp_path / "samples_prompts.txt").read().splitlines() == prompts


# ------------------------------------------------------------------------------------------------ engines
ENGINE_SAMPLING = {"pixel": ["--n_samples", 4, "--batch_size", 4],
                   "text": ["--n_prompts", 2, "--images_per_prompt", 2, "--batch_size", 4]}


@pytest.mark.parametrize("family", sorted(ENGINE_SAMPLING))
def test_engine_samples_like_the_fake_quant_model(family, request, tmp_path):
    """07 deploys a model of each new family (the DDIM Model: no context, its SiLU a function; the text model: a
    [77, 64] text context) and 04 --engine samples with it: every int8 part exact (--wide fp), so the samples are the
    fake-quant ones up to float reassociation (PSNR > 35 dB)."""
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (pip install -e '.[deploy]')")
    import openvino as ov
    model, calib_dir = request.getfixturevalue(family)
    shutil.copy2(calib_dir / "calib.pt", tmp_path / "calib.pt")
    common = model + ["--run_dir", tmp_path]
    run("02_quantize_ldm_naive.py", *common, "--method", "efficientdm", "--n_bits_w", 4, "--n_bits_a", 8,
        "--n_calib", 8)
    engine = tmp_path / "engine" / "unet.xml"
    run("07_deploy.py", *common, "--stage", "naive", "--out", engine, "--wide", "fp")
    graph = ov.Core().read_model(str(engine))
    ranks = {op.get_input_partial_shape(0).rank.get_length() for op in graph.get_ops()
             if op.get_type_name() in ("Sigmoid", "Swish", "FakeQuantize")}
    assert ranks and max(ranks) <= 3   # SiLUs and quantizers run on rows views (engine rule 5)
    sample = ["--stage", "naive", *ENGINE_SAMPLING[family]]
    run("04_sample_lora_model.py", *common, *sample, "--out", tmp_path / "fake.npz")
    run("04_sample_lora_model.py", *common, "--engine", "openvino", engine, *sample[2:], "--out", tmp_path / "e.npz")
    got, fake = _arrays(tmp_path / "e.npz"), _arrays(tmp_path / "fake.npz")
    mse = ((got["arr_0"].astype(float) - fake["arr_0"].astype(float)) ** 2).mean()
    # a code flipped at a rounding tie moves later steps a little (more under the text model's CFG 3 and decoder);
    # a lost zero-point term, step scale or smoothing gives noise (PSNR ~10-20 dB)
    assert got["arr_0"].shape == (4, 32, 32, 3) and 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 35, mse
    if family == "text":
        assert got["prompts"].tolist() == fake["prompts"].tolist()


# ------------------------------------------------------------------------------------------------ sd-v1-4
def _coco(path, captions):
    path.write_text(json.dumps({"images": [], "annotations": [{"image_id": i, "id": i, "caption": c}
                                                              for i, c in enumerate(captions)]}))
    return str(path)


def test_sd_preset_path_with_a_stand_in(tmp_path, monkeypatch, capsys):
    """sd-v1-4's code path (PLMS, CFG 7.5, COCO captions, 77-token text contexts, the local CLIP tokenizer) with the
    embedded text model standing in for the SD checkpoint and its tokenizer for CLIP's."""
    from quant.artifacts import load_artifact
    from script_runner import assert_one_sentence, run_main

    if not os.path.isfile(TEXT_CKPT):
        pytest.skip("the shipped digits-txt2img checkpoint is missing (scripts/train_digits_txt2img.py)")
    # without the real checkpoint (or tokenizer) the preset says how to get it, in one sentence
    code, _, err = run_main("quant_scripts/01_collect_input_4_calib.py",
                            ["--preset", "sd-v1-4", "--run_dir", tmp_path / "x", "--calib_prompts", "digits-train",
                             "--eval_n_prompts", "4"], capsys)
    if not os.path.isfile(os.path.join(REPO, "models/ldm/stable-diffusion-v1/model.ckpt")):
        assert "bash scripts/download_models.sh sd-v1-4" in assert_one_sentence(code, err)
    monkeypatch.setenv("MPQDM_CLIP_TOKENIZER", str(tmp_path))  # no vocab.json there
    code, _, err = run_main("quant_scripts/01_collect_input_4_calib.py",
                            ["--preset", "sd-v1-4", "--config", TEXT_CONFIG, "--ckpt", TEXT_CKPT, "--run_dir",
                             tmp_path / "x", "--calib_prompts", "digits-train", "--calib_batches", "1",
                             "--eval_n_prompts", "4"], capsys)
    assert "CLIP tokenizer" in assert_one_sentence(code, err)

    monkeypatch.setenv("MPQDM_CLIP_TOKENIZER", TEXT_TOKENIZER)
    captions = [f"a handwritten {w}" for w in ("zero", "one", "two", "three", "four", "five")] + [
        "the digit 7", "the digit 8"]
    coco = _coco(tmp_path / "captions.json", captions)
    common = ["--preset", "sd-v1-4", "--config", TEXT_CONFIG, "--ckpt", TEXT_CKPT, "--device", "cpu", "--threads",
              "1", "--no_progress", "--run_dir", tmp_path / "run"]
    run("01_collect_input_4_calib.py", *common, "--calib_prompts", coco, "--eval_n_prompts", 4, "--calib_steps", 4,
        "--calib_batch", 2, "--calib_batches", 1)
    calib = load_artifact(tmp_path / "run" / "calib.pt")
    meta = calib["meta"]
    assert (meta["sampler"], meta["calib_scale"]) == ("plms", 7.5)  # the preset's recipe
    assert calib["context"].shape[1:] == (77, 64)
    evaluation = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))[:4]]
    assert not set(meta["calib_prompts"]["prompts"]) & set(evaluation)  # disjoint by default
    run("02_quantize_ldm_naive.py", *common, "--method", "efficientdm", "--n_bits_w", 4, "--n_bits_a", 8,
        "--n_calib", 8, "--train_steps", 4, "--lora_rank", 2)
    run("04_sample_lora_model.py", *common, "--stage", "naive", "--prompts", coco, "--n_prompts", 4, "--batch_size",
        2, "--ddim_steps", 4)
    samples = _arrays(tmp_path / "run" / "samples.npz")
    assert samples["prompts"].tolist() == evaluation
    assert json.loads(str(samples["meta"]))["scale"] == 7.5
    # an evaluation selection that takes in calibration prompts is refused (EDA-DM's overlap is opt-in at 01)
    code, _, err = run_main("quant_scripts/04_sample_lora_model.py",
                            common + ["--stage", "naive", "--prompts", coco, "--n_prompts", "8", "--ddim_steps", "4",
                                      "--out", tmp_path / "all.npz"], capsys)
    assert "calibration prompts" in assert_one_sentence(code, err)


# ------------------------------------------------------------------------------------------------ cifar10
def test_cifar10_preset_full_size_smoke(tmp_path):
    """The cifar10 preset's 01 -> 04 on a random-weight full-size Model (35.7 M parameters), 2 quad steps, CPU."""
    from quant.artifacts import load_artifact

    ckpt = random_pixel_ckpt(CIFAR_CONFIG, tmp_path / "cifar_random.ckpt")
    common = ["--preset", "cifar10", "--config", CIFAR_CONFIG, "--ckpt", ckpt, "--device", "cpu", "--threads", "1",
              "--no_progress", "--run_dir", tmp_path / "run"]
    run("01_collect_input_4_calib.py", *common, "--calib_steps", 2, "--calib_batch", 2, "--calib_batches", 1)
    run("02_quantize_ldm_naive.py", *common, "--method", "efficientdm", "--n_bits_w", 4, "--n_bits_a", 8, "--n_calib",
        4, "--train_steps", 2, "--lora_rank", 4)
    run("03_train_mpqdm.py", *common, "--epochs", 1, "--batch_size", 1, "--preview_every", 0)
    run("04_sample_lora_model.py", *common, "--n_samples", 2, "--batch_size", 2)
    naive = load_artifact(tmp_path / "run" / "naive.pt")["meta"]
    assert naive["timesteps"] == [0, 800] and naive["policy"]["family"] == "ddim_model"
    samples = _arrays(tmp_path / "run" / "samples.npz")
    meta = json.loads(str(samples["meta"]))
    assert samples["arr_0"].shape == (2, 32, 32, 3) and meta["batch_size"] == 2 and meta["skip_type"] == "quad"
    import resource
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # the process's peak so far (Linux: KiB)
    print(f"cifar10 preset 01->04 on the full-size Model, CPU: peak RSS of this test process {peak_mib:.0f} MiB")
    assert peak_mib < 12 * 1024   # a 35.7 M-parameter model and its quantized copy fit a laptop
