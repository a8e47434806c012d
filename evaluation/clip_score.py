"""CLIP score of text-to-image samples, in the variants the peers use (TXT2IMG_CIFAR.md A.4), and the embedded
digits model's surrogate (the digits CNN's accuracy against the digit each prompt names).

CLIP score = w * cos(E_img(image), E_txt(prompt)) per sample, averaged over samples, with transformers'
CLIPModel, tokenizer and image processor loaded from one local folder (ViT-L/14 by default; never downloaded).
Variants (the name, the model path and the truncation rule go into the returned dict, i.e. into metrics.json):
- "toolkit" (default, the A.4 recommendation): w = 100, mean over samples, only the mean clamped at 0
  (torchmetrics' code), captions truncated to 77 tokens with <|endoftext|> kept;
- "per_sample_clamp": mean of max(100 cos, 0) (torchmetrics' documentation);
- "hessel": mean of 2.5 max(cos, 0) with the prompt prefixed "A photo depicts " (Hessel et al. 2021, ViT-B/32
  in the original), truncated;
- "taited": w = the model's logit_scale.exp() (100 in the OpenAI weights), no clamp, and no truncation: a
  prompt over 77 tokens is refused, as Taited/clip-score's clip.tokenize raises.
"""
import os
from dataclasses import dataclass

import numpy as np

from ldm.util import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CLIP_ID = "openai/clip-vit-large-patch14"
DEFAULT_CLIP_DIR = os.path.join(REPO_ROOT, "models", "clip", "clip-vit-large-patch14")
CLIP_MODEL_ENV = "MPQDM_CLIP_MODEL"
CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class ClipScoreVariant:
    name: str
    weight: str  # "100", "2.5" or "logit_scale"
    clamp: str  # "mean", "per_sample" or "none"
    truncate: bool
    prefix: str
    source: str

    def describe(self):
        w = {"100": "100", "2.5": "2.5", "logit_scale": "logit_scale.exp()"}[self.weight]
        per_sample = f"max({w}*cos, 0)" if self.clamp == "per_sample" else f"{w}*cos"
        formula = f"mean over samples of {per_sample}"
        return f"max({formula}, 0)" if self.clamp == "mean" else formula


VARIANTS = {v.name: v for v in [
    ClipScoreVariant("toolkit", "100", "mean", True, "",
                     "TXT2IMG_CIFAR.md A.4 recommendation (torchmetrics CLIPScore code: the mean is clamped)"),
    ClipScoreVariant("per_sample_clamp", "100", "per_sample", True, "",
                     "torchmetrics CLIPScore documentation / per-sample clamp"),
    ClipScoreVariant("hessel", "2.5", "per_sample", True, "A photo depicts ",
                     "Hessel et al. 2021 (jmhessel/clipscore)"),
    ClipScoreVariant("taited", "logit_scale", "none", False, "", "Taited/clip-score (used by TFMQ-DM and EDA-DM)"),
]}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("the CLIP score needs the `transformers` package; install it with "
                        "`pip install -e .[clip]`") from None
    return transformers


def resolve_clip_model(path=None):
    """A local CLIP folder: `path`, else $MPQDM_CLIP_MODEL, else models/clip/clip-vit-large-patch14, else the
    Hugging Face cache's openai/clip-vit-large-patch14 (never downloaded)."""
    explicit = path or os.environ.get(CLIP_MODEL_ENV)
    if explicit:
        if os.path.isfile(os.path.join(explicit, "config.json")):
            return os.path.abspath(explicit)
        raise UserError(f"no CLIP model in {explicit} (config.json missing); pass a folder written by "
                        "CLIPModel.save_pretrained together with its tokenizer and image processor files")
    if os.path.isfile(os.path.join(DEFAULT_CLIP_DIR, "config.json")):
        return DEFAULT_CLIP_DIR
    try:
        from huggingface_hub import snapshot_download

        cached = snapshot_download(DEFAULT_CLIP_ID, local_files_only=True)
        if os.path.isfile(os.path.join(cached, "config.json")):
            return cached
    except Exception:  # not cached, or no hub client: say where to put it
        pass
    raise UserError(f"CLIP model not found: put {DEFAULT_CLIP_ID} (config, weights, tokenizer and preprocessor "
                    f"files) in {DEFAULT_CLIP_DIR}, set ${CLIP_MODEL_ENV}, or fill the Hugging Face cache on a "
                    "machine with internet (`pip install -e .[clip]` provides the loader)")


class ClipScorer:
    """CLIP image and text embeddings (L2-normalised, float64 on the CPU) from one local model folder."""

    def __init__(self, model_path=None, device="cpu", batch_size=64):
        import torch

        tf = _transformers()
        self.model_path = resolve_clip_model(model_path)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        try:
            self.model = tf.CLIPModel.from_pretrained(self.model_path, local_files_only=True)
            self.tokenizer = tf.CLIPTokenizer.from_pretrained(self.model_path, local_files_only=True)
            self.processor = tf.CLIPImageProcessor.from_pretrained(self.model_path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"could not load the CLIP model, tokenizer and image processor from {self.model_path} "
                            f"({type(err).__name__}); save all three there with save_pretrained") from None
        self.model = self.model.to(self.device).eval().float()

    def token_lengths(self, prompts):
        ids = self.tokenizer(list(prompts), truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def embed_texts(self, prompts):
        import torch

        out = []
        for s in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(list(prompts[s:s + self.batch_size]), truncation=True, max_length=CONTEXT_LENGTH,
                                 padding="max_length", return_tensors="pt")
            with torch.no_grad():
                pooled = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                               attention_mask=enc["attention_mask"].to(self.device)).pooler_output
                out.append(self.model.text_projection(pooled).double().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).numpy()

    def pixel_values(self, images):
        """The model's own preprocessing (resize, center crop, rescale, normalise) of uint8 NHWC images."""
        copies = [np.array(img) for img in images]  # writable: torch.from_numpy warns on read-only arrays
        return self.processor(images=copies, return_tensors="pt")["pixel_values"]

    def embed_images(self, images):
        import torch

        out = []
        for s in range(0, len(images), self.batch_size):
            pixels = self.pixel_values(images[s:s + self.batch_size]).to(self.device, torch.float32)
            with torch.no_grad():
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                out.append(self.model.visual_projection(pooled).double().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).numpy()

    def describe_preprocessing(self):
        p = self.processor
        return {"processor": type(p).__name__, "size": _plain(getattr(p, "size", None)),
                "crop_size": _plain(getattr(p, "crop_size", None)), "resample": str(getattr(p, "resample", None)),
                "image_mean": _plain(getattr(p, "image_mean", None)),
                "image_std": _plain(getattr(p, "image_std", None))}


def _plain(value):
    if value is None:
        return None
    if hasattr(value, "items"):
        return {k: v for k, v in dict(value).items() if v is not None}
    return list(value) if isinstance(value, (list, tuple)) else value


def _variant(name):
    if name not in VARIANTS:
        raise UserError(f"unknown CLIP score variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def _text_embeddings(scorer, v, prompts):
    """(normalised text embeddings, number of prompts over 77 tokens); refused for a non-truncating variant."""
    texts = [v.prefix + str(p) for p in prompts]
    lengths = scorer.token_lengths(texts)
    too_long = [i for i, n in enumerate(lengths) if n > CONTEXT_LENGTH]
    if too_long and not v.truncate:
        raise UserError(f"{len(too_long)} prompts are longer than CLIP's {CONTEXT_LENGTH} tokens (first: prompt "
                        f"{too_long[0]}, {lengths[too_long[0]]} tokens) and the {v.name} variant does not truncate; "
                        "use the default variant, which truncates them")
    return scorer.embed_texts(texts), len(too_long)


def _aggregate(cos, v, scorer, n_truncated, return_per_sample):
    weight = float(scorer.model.logit_scale.detach().exp()) if v.weight == "logit_scale" else float(v.weight)
    per_sample = weight * (np.maximum(cos, 0.0) if v.clamp == "per_sample" else cos)
    score = float(per_sample.mean())
    if v.clamp == "mean":
        score = max(score, 0.0)
    result = {
        "clip_score": score, "variant": v.name, "formula": v.describe(), "weight": weight, "clamp": v.clamp,
        "prefix": v.prefix, "variant_source": v.source, "model": scorer.model_path,
        "truncation": (f"truncated to {CONTEXT_LENGTH} tokens, <|startoftext|> and <|endoftext|> kept"
                       if v.truncate else f"none: prompts over {CONTEXT_LENGTH} tokens are refused"),
        "num_truncated": n_truncated, "num_samples": int(len(cos)),
        "cos_mean": float(cos.mean()), "cos_std": float(cos.std()),
        "image_preprocessing": scorer.describe_preprocessing(),
    }
    if return_per_sample:
        result["per_sample"] = per_sample
    return result


def clip_score(images, prompts, model_path=None, variant="toolkit", device="cpu", batch_size=64, scorer=None,
               return_per_sample=False):
    """CLIP score of uint8 NHWC `images` against their `prompts` (one each) as a JSON-ready dict."""
    v = _variant(variant)
    images, prompts = np.asarray(images), [str(p) for p in prompts]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"the CLIP score expects uint8 images [N,H,W,3], got {images.dtype} {images.shape}")
    if len(images) != len(prompts) or not len(prompts):
        raise UserError(f"the CLIP score needs one prompt per image, got {len(images)} images and {len(prompts)} "
                        "prompts")
    scorer = scorer or ClipScorer(model_path, device, batch_size)
    text, n_truncated = _text_embeddings(scorer, v, prompts)
    cos = np.sum(scorer.embed_images(images) * text, axis=1)
    return _aggregate(cos, v, scorer, n_truncated, return_per_sample)


def clip_score_npz(sample_path, model_path=None, variant="toolkit", device="cpu", batch_size=64, scorer=None):
    """CLIP score of a text-to-image sample file (arr_0 uint8 NHWC + `prompts`, as scripts/txt2img.py writes
    it), streaming the images in batches."""
    from evaluation.npz_io import check_image_array, iter_npz_batches, load_npz_array

    v = _variant(variant)
    n = check_image_array(sample_path)[0]
    prompts = load_npz_array(sample_path, "prompts").tolist()
    if len(prompts) != n:
        raise UserError(f"{sample_path} holds {n} images but {len(prompts)} prompts; one prompt per image is needed")
    scorer = scorer or ClipScorer(model_path, device, batch_size)
    text, n_truncated = _text_embeddings(scorer, v, prompts)
    image = np.concatenate([scorer.embed_images(b) for b in iter_npz_batches(sample_path, "arr_0", scorer.batch_size)])
    result = _aggregate(np.sum(image * text, axis=1), v, scorer, n_truncated, False)
    result["samples"] = os.path.abspath(sample_path)
    return result


def digits_prompt_accuracy(images, prompts, extractor=None):
    """The embedded digits model's stand-in for the CLIP score: the share of images that the digits CNN classifies
    as the digit their prompt names (ldm.data.prompts.digit_of_prompt), overall and per digit."""
    from evaluation.digits_cnn import DigitsExtractor
    from ldm.data.prompts import digit_labels

    labels = digit_labels(prompts)
    if len(labels) != len(images):
        raise UserError(f"prompt accuracy needs one prompt per image, got {len(images)} images and {len(labels)} "
                        "prompts")
    extractor = extractor or DigitsExtractor()
    pred = extractor(np.asarray(images))["logits"].argmax(axis=1)
    hit = pred == labels
    return {"prompt_accuracy": float(hit.mean()), "num_samples": int(len(labels)),
            "per_digit": {int(d): float(hit[labels == d].mean()) for d in np.unique(labels)},
            "metric": "digits CNN argmax == digit named by the prompt (stand-in for the CLIP score)",
            "extractor": extractor.describe()}
