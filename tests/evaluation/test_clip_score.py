"""CLIP score on a randomly initialised tiny CLIPModel saved offline, against an explicit normalised dot product
computed here from the raw towers; the clamp / weight / prefix variants; truncation of long prompts; the digits
prompt-accuracy stand-in."""
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (optional [clip] extra)")

from evaluation.clip_score import (VARIANTS, ClipScorer, clip_score, clip_score_npz,  # noqa: E402
                                   digits_prompt_accuracy)
from ldm.util import UserError  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a red bus", "two cats on a couch", "a handwritten seven", "a bowl of fruit", "a man riding a horse",
           "the digit 3"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from ldm.modules.encoders.clip_bpe import write_clip_tokenizer

    path = str(tmp_path_factory.mktemp("tiny_clip"))
    vocab = write_clip_tokenizer(path, PROMPTS + ["zebra stripes"])
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_mean=list(MEAN), image_std=list(STD)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer(clip_dir, batch_size=4)  # batch 4 < 6 samples: exercises batching


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


@torch.no_grad()
def reference_cosines(clip_dir, images, token_rows):
    """cos between the projected image and text embeddings, from the raw towers with preprocessing done here."""
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0  # 32x32 input: resize and crop are no-ops
    x = ((x - torch.tensor(MEAN, dtype=torch.float64)[:, None, None])
         / torch.tensor(STD, dtype=torch.float64)[:, None, None]).float()
    img = model.visual_projection(model.vision_model(pixel_values=x).pooler_output).double()
    eos = model.config.text_config.eos_token_id
    feats = []
    for ids in token_rows:  # one prompt at a time, unpadded: the pooled token is the last one (the EOS)
        hidden = model.text_model(input_ids=torch.tensor([ids])).last_hidden_state
        assert ids[-1] == eos
        feats.append(model.text_projection(hidden[:, -1]).double())  # last_hidden_state is after the final LN
    txt = torch.cat(feats)
    return ((img / img.norm(dim=1, keepdim=True)) * (txt / txt.norm(dim=1, keepdim=True))).sum(1).numpy()


def _ids(scorer, prompt):
    return scorer.tokenizer([prompt], truncation=False, verbose=False)["input_ids"][0]


def test_default_score_is_100_cos_mean(clip_dir, scorer, images):
    cos = reference_cosines(clip_dir, images, [_ids(scorer, p) for p in PROMPTS])
    out = clip_score(images, PROMPTS, scorer=scorer, return_per_sample=True)
    np.testing.assert_allclose(out["per_sample"], 100 * cos, atol=1e-3)
    assert out["clip_score"] == pytest.approx(max(100 * cos.mean(), 0.0), abs=1e-3)
    assert out["variant"] == "toolkit" and out["model"] == os.path.abspath(clip_dir)
    assert out["num_samples"] == 6 and out["num_truncated"] == 0 and "77" in out["truncation"]
    assert out["image_preprocessing"]["crop_size"] == {"height": 32, "width": 32}


def test_variants_clamp_weight_and_prefix(clip_dir, scorer, images):
    cos = reference_cosines(clip_dir, images, [_ids(scorer, p) for p in PROMPTS])
    pos, neg = np.flatnonzero(cos > 0), np.flatnonzero(cos < 0)
    assert len(pos) and len(neg), "the random model should give both signs of cosine"
    mixed = list(pos[:1]) + list(neg)
    run = lambda idx, v: clip_score(images[idx], [PROMPTS[i] for i in idx], variant=v, scorer=scorer)  # noqa: E731
    assert run(mixed, "per_sample_clamp")["clip_score"] == pytest.approx(100 * cos[pos[0]] / len(mixed), abs=1e-3)
    assert run(list(neg), "toolkit")["clip_score"] == 0.0  # negative mean clamped
    assert run(list(neg), "per_sample_clamp")["clip_score"] == 0.0
    logit_scale = float(transformers.CLIPModel.from_pretrained(clip_dir).logit_scale.detach().exp())
    taited = run(list(neg), "taited")
    assert taited["clip_score"] == pytest.approx(logit_scale * cos[neg].mean(), abs=1e-3) and taited["clip_score"] < 0
    hessel_cos = reference_cosines(clip_dir, images, [_ids(scorer, "A photo depicts " + p) for p in PROMPTS])
    hessel = clip_score(images, PROMPTS, variant="hessel", scorer=scorer)
    assert hessel["clip_score"] == pytest.approx(2.5 * np.maximum(hessel_cos, 0).mean(), abs=1e-4)
    assert hessel["prefix"] == "A photo depicts "
    assert {clip_score(images, PROMPTS, variant=v, scorer=scorer)["variant"] for v in VARIANTS} == set(VARIANTS)


def test_long_prompt_is_truncated_with_eos_kept_not_refused(clip_dir, scorer, images):
    long_prompt = " ".join(["zebra stripes"] * 60)
    ids = _ids(scorer, long_prompt)
    assert len(ids) > 77
    truncated = ids[:76] + [ids[-1]]  # 75 tokens after the start token, then the end token
    cos = reference_cosines(clip_dir, images[:2], [truncated, _ids(scorer, PROMPTS[1])])
    out = clip_score(images[:2], [long_prompt, PROMPTS[1]], scorer=scorer, return_per_sample=True)
    np.testing.assert_allclose(out["per_sample"], 100 * cos, atol=1e-3)
    assert out["num_truncated"] == 1
    with pytest.raises(UserError, match="does not truncate"):
        clip_score(images[:2], [long_prompt, PROMPTS[1]], variant="taited", scorer=scorer)


def test_npz_scoring_streams_the_same_result(tmp_path, scorer, images):
    path = str(tmp_path / "samples.npz")
    np.savez(path, arr_0=images, prompts=np.array(PROMPTS))
    direct = clip_score(images, PROMPTS, scorer=scorer)
    streamed = clip_score_npz(path, scorer=scorer)
    assert streamed["clip_score"] == pytest.approx(direct["clip_score"], abs=1e-9)
    assert streamed["num_samples"] == 6 and streamed["samples"] == path
    np.savez(path, arr_0=images, prompts=np.array(PROMPTS[:5]))
    with pytest.raises(UserError, match="one prompt per image"):
        clip_score_npz(path, scorer=scorer)


def test_user_errors(tmp_path, images, scorer):
    with pytest.raises(UserError, match="no CLIP model"):
        clip_score(images, PROMPTS, model_path=str(tmp_path))
    with pytest.raises(UserError, match="unknown CLIP score variant"):
        clip_score(images, PROMPTS, variant="nope", scorer=scorer)
    with pytest.raises(UserError, match="one prompt per image"):
        clip_score(images, PROMPTS[:2], scorer=scorer)


def test_digits_prompt_accuracy_against_true_and_wrong_digits():
    from evaluation.digits_cnn import DEFAULT_DIGITS_CNN_PATH
    from ldm.data.digits import load_digits_split, to_uint8
    from ldm.data.prompts import digit_prompts

    if not os.path.isfile(DEFAULT_DIGITS_CNN_PATH):
        pytest.skip("digits CNN not shipped")
    x, y = load_digits_split("heldout")
    images = to_uint8(x[:100])
    right = [digit_prompts(int(d), heldout=True)[0] for d in y[:100]]
    wrong = [digit_prompts((int(d) + 1) % 10)[3] for d in y[:100]]
    good = digits_prompt_accuracy(images, right)
    assert good["prompt_accuracy"] >= 0.95 and good["num_samples"] == 100
    assert set(good["per_digit"]) == set(int(d) for d in y[:100])
    assert digits_prompt_accuracy(images, wrong)["prompt_accuracy"] <= 0.05
