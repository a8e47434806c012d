"""The embedded text-to-image digits model: its offline tokenizer, its config, the shipped checkpoint (safe loader,
SD layout), short PLMS sampling that follows the prompt, and the training script's bit-for-bit resume."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("transformers", reason="transformers not installed (optional [clip] extra)")

from ldm.data.prompts import digits_prompt_list  # noqa: E402
from ldm.modules.encoders.clip_bpe import write_clip_tokenizer  # noqa: E402
from ldm.util import load_model_from_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "stable-diffusion", "digits-txt2img.yaml")
MODEL_DIR = os.path.join(ROOT, "models", "ldm", "digits-txt2img")
CKPT = os.path.join(MODEL_DIR, "model.ckpt")
TOKENIZER = os.path.join(MODEL_DIR, "tokenizer")
needs_ckpt = pytest.mark.skipif(not os.path.isfile(CKPT), reason="digits-txt2img checkpoint not trained yet")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text_params():
    model = OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=True)["model"]
    return model["params"]["cond_stage_config"]["params"]


def test_shipped_tokenizer_is_the_offline_rebuild(tmp_path):
    corpus = digits_prompt_list() + digits_prompt_list(heldout=True)
    size = write_clip_tokenizer(str(tmp_path), corpus)
    for name in sorted(os.listdir(tmp_path)):
        with open(tmp_path / name, "rb") as a, open(os.path.join(TOKENIZER, name), "rb") as b:
            assert a.read() == b.read(), name
    text = _text_params()["text_config"]
    assert (text["vocab_size"], text["bos_token_id"], text["eos_token_id"]) == (size, size - 2, size - 1)


def test_embedder_tokenizes_like_sd_from_the_local_folder():
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    params = _text_params()
    emb = FrozenCLIPEmbedder(**params)  # `version` is relative to the repository root
    bos, eos = params["text_config"]["bos_token_id"], params["text_config"]["eos_token_id"]
    vocab = emb.tokenizer.get_vocab()
    ids = emb.tokenize(["a handwritten seven", ""])
    assert ids.shape == (2, 77)
    assert ids[0, :5].tolist() == [bos, vocab["a</w>"], vocab["handwritten</w>"], vocab["seven</w>"], eos]
    assert (ids[0, 5:] == eos).all() and ids[1, 0] == bos and (ids[1, 1:] == eos).all()
    long = emb.tokenize([" ".join(["seven"] * 100)])[0]  # truncated: start token, 75 tokens, end token
    assert long[0] == bos and long[76] == eos and (long[1:76] == vocab["seven</w>"]).all()
    train = digits_prompt_list()
    n_tokens = (emb.tokenize(train) != eos).sum(1).tolist()  # start token + content tokens
    assert n_tokens == [len(p.replace(",", " ,").split()) + 1 for p in train]  # every training word is one token
    c = emb(["a handwritten seven", "a handwritten three", ""])
    assert c.shape == (3, 77, 64) and torch.isfinite(c).all()
    assert (c[0] - c[1]).abs().max() > 1e-3 and (c[0] - c[2]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def model():
    return load_model_from_config(OmegaConf.load(CONFIG), CKPT)


@needs_ckpt
def test_checkpoint_is_a_plain_sd_style_container(model):
    container = torch.load(CKPT, map_location="cpu", weights_only=True)  # tensors and plain types only
    assert set(container) >= {"state_dict", "global_step"} and container["global_step"] > 0
    sd = container["state_dict"]
    assert list(sd) == list(model.state_dict())
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.1.") for k in sd)
    assert any(k.startswith("first_stage_model.quant_conv") for k in sd)
    assert os.path.getsize(CKPT) < 8 * 2 ** 20
    assert type(model.first_stage_model).__name__ == "AutoencoderKL"
    assert type(model.cond_stage_model).__name__ == "FrozenCLIPEmbedder"
    assert model.scale_factor == pytest.approx(0.18215) and model.channels == 4 and model.image_size == 8


@needs_ckpt
def test_first_stage_latents_are_unit_scale(model):
    from ldm.data.digits import load_digits_split

    x, _ = load_digits_split("heldout")
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(x[:100]).mode())
        rec = model.decode_first_stage(z)
    assert z.shape == (100, 4, 8, 8) and 0.8 < float(z.std()) < 1.2
    assert float((rec - x[:100]).abs().mean()) < 0.1  # held-out digits reconstruct


@needs_ckpt
def test_short_plms_sampling_follows_the_prompt(model):
    from evaluation.digits_cnn import DEFAULT_DIGITS_CNN_PATH, DigitsExtractor
    from ldm.generate import initial_noise, to_uint8_nhwc
    from ldm.pipelines import adapter_for

    fam = adapter_for(model)  # the family adapter that scripts/txt2img.py and 04 sample through
    assert fam.conditioning == "text"
    prompts = ["a handwritten three", "a handwritten seven"]
    noise = initial_noise(0, [0], [4, 8, 8]).repeat(2, 1, 1, 1)  # the same x_T for both prompts
    z = fam.sample(noise, fam.cond(prompts), fam.uncond(2), 5.0, 10, 0.0, "plms",
                   generator=torch.Generator().manual_seed(0))
    images = to_uint8_nhwc(fam.decode(z))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 20  # not constant
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 10  # the prompt changes the image
    if os.path.isfile(DEFAULT_DIGITS_CNN_PATH):
        assert DigitsExtractor()(images)["logits"].argmax(1).tolist() == [3, 7]


TINY = ["--ae_steps", "3", "--ae_batch_size", "4", "--text_steps", "3", "--ldm_steps", "4", "--ldm_batch_size", "4",
        "--ldm_warmup", "1", "--ckpt_every", "2", "--no_progress"]


def test_training_resumes_bit_for_bit(tmp_path, monkeypatch):
    import ldm.data.digits

    train = _script("train_digits_txt2img")
    images, labels = ldm.data.digits.load_digits_split("train")
    monkeypatch.setattr(ldm.data.digits, "load_digits_split", lambda split: (images[:64], labels[:64]))
    clean = str(tmp_path / "clean.ckpt")
    train.main(TINY + ["--work_dir", str(tmp_path / "a"), "--out", clean])

    # interrupt the second run after 3 diffusion steps (a checkpoint exists at step 2), then rerun it
    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    resumed = str(tmp_path / "resumed.ckpt")
    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + ["--work_dir", str(tmp_path / "b"), "--out", resumed])
    assert not os.path.exists(resumed)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train.main(TINY + ["--work_dir", str(tmp_path / "b"), "--out", resumed])

    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (clean, resumed))
    assert a["training"]["state_dict_sha256"] == b["training"]["state_dict_sha256"]
    assert train.state_dict_sha256(a["state_dict"]) == a["training"]["state_dict_sha256"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    fresh = load_model_from_config(OmegaConf.load(CONFIG), clean)  # the container loads with the safe loader
    assert fresh.global_step == 4
