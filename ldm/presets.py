"""Named model presets: which config and checkpoint a name means, its family, and the paper's sampling settings.

Scripts accept `--preset NAME` instead of `--config/--ckpt`; the sampling defaults are those of the evaluation
protocol (EVALUATION.md sections 1-2, TXT2IMG_CIFAR.md A.1 and B.3-B.4) so that a preset run is comparable with the
published tables. Paths are relative to the repository root and resolved from this file, so scripts work from any
directory.

Families (what ldm.pipelines drives): ``ldm`` = a CompVis LatentDiffusion (YAML config), conditioned on a class
(``class``), on text through FrozenCLIPEmbedder (``text``) or on nothing (``none``); ``pixel`` = the DDIM paper's
pixel-space Model (ddim/, ddim YAML config) wrapped in ddim.pipeline.PixelDiffusion, unconditional.
"""
import os
from dataclasses import dataclass
from typing import Optional

from ldm.util import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("ldm", "pixel")
CONDITIONINGS = ("class", "text", "none")
CLIP_TOKENIZER_ID = "openai/clip-vit-large-patch14"
CLIP_TOKENIZER_ENV = "MPQDM_CLIP_TOKENIZER"
CLIP_TOKENIZER_DIR = "models/clip/clip-vit-large-patch14"  # the CLIP-score model folder holds the tokenizer too


@dataclass(frozen=True)
class ModelPreset:
    name: str
    config: str  # relative to the repository root
    ckpt: str
    download: Optional[str]  # argument of scripts/download_models.sh; None for a model trained here
    class_conditional: bool
    n_classes: int = 0  # real classes (the null class of classifier-free guidance is extra)
    null_class: Optional[int] = None
    use_ema: bool = False  # sample with the checkpoint's EMA weights
    sampler: str = "ddim"
    ddim_steps: int = 20
    eta: float = 0.0
    scale: float = 1.0
    n_samples: int = 50_000
    batch_size: int = 50
    source: str = ""  # where the sampling defaults come from
    family: str = "ldm"
    conditioning: Optional[str] = None  # None: "class" if class_conditional else "none"
    skip_type: str = "uniform"  # timestep spacing: uniform (CompVis, ddim) or quad (ddim's quadratic skip)
    trained_by: Optional[str] = None  # the script that recreates a model trained here
    # text presets: the evaluation prompts (04) and the calibration prompts (01); a source is a COCO captions
    # JSON, a text file or digits-train / digits-heldout (ldm.data.prompts); None = the user must name one
    prompts: Optional[str] = None
    n_prompts: Optional[int] = None  # seeded selection of this many (None: all, in order)
    images_per_prompt: int = 1
    calib_prompts: Optional[str] = None
    clip_tokenizer: bool = False  # the tokenizer is openai/clip-vit-large-patch14, found locally (SD)

    @property
    def config_path(self):
        return os.path.join(REPO_ROOT, self.config)

    @property
    def ckpt_path(self):
        return os.path.join(REPO_ROOT, self.ckpt)

    @property
    def cond_kind(self):
        """"class", "text" or "none"."""
        return self.conditioning or ("class" if self.class_conditional else "none")

    @property
    def samples_per_class(self):
        return self.n_samples // self.n_classes if self.class_conditional else None

    def missing_checkpoint_hint(self):
        if self.download is not None:
            return f"download it with `bash scripts/download_models.sh {self.download}`"
        return f"recreate it with `python {self.trained_by or 'scripts/train_digits_ldm.py'}`"

    def sampling_defaults(self):
        return dict(sampler=self.sampler, ddim_steps=self.ddim_steps, eta=self.eta, scale=self.scale,
                    n_samples=self.n_samples, batch_size=self.batch_size)


PRESETS = {p.name: p for p in [
    ModelPreset("digits", "configs/latent-diffusion/digits-ldm-vq-4.yaml", "models/ldm/digits-ldm-vq-4/model.ckpt",
                download=None, class_conditional=True, n_classes=10, null_class=10, ddim_steps=20, eta=0.0,
                scale=3.0, n_samples=1000, batch_size=100, trained_by="scripts/train_digits_ldm.py",
                source="the ImageNet protocol in miniature: DDIM 20, eta 0, CFG 3.0, 100 per class"),
    ModelPreset("cin256-v2", "configs/latent-diffusion/cin256-v2.yaml", "models/ldm/cin256-v2/model.ckpt",
                download="cin256-v2", class_conditional=True, n_classes=1000, null_class=1000, ddim_steps=20,
                eta=0.0, scale=3.0, n_samples=50_000, batch_size=50,
                source="EVALUATION.md section 1 (EfficientDM / MPQ-DM): DDIM 20, eta 0, CFG 3.0, 50 per class"),
    ModelPreset("lsun_beds256", "configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml",
                "models/ldm/lsun_beds256/model.ckpt", download="lsun_bedrooms", class_conditional=False,
                use_ema=True, ddim_steps=100, eta=1.0, n_samples=50_000, batch_size=50,
                source="EVALUATION.md section 2, MPQ-DM code: DDIM 100, eta 1.0 (peers use 200 steps)"),
    ModelPreset("lsun_churches256", "configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml",
                "models/ldm/lsun_churches256/model.ckpt", download="lsun_churches", class_conditional=False,
                use_ema=True, ddim_steps=400, eta=0.0, n_samples=50_000, batch_size=50,
                source="EVALUATION.md section 2, Q-Diffusion / TFMQ-DM: DDIM 400, eta 0 (MPQ-DM has no script)"),
    ModelPreset("cifar10", "configs/ddim/cifar10.yml", "models/ddim/cifar10/model-790000.ckpt", download="cifar10",
                class_conditional=False, family="pixel", sampler="ddim", skip_type="quad", ddim_steps=100, eta=0.0,
                n_samples=50_000, batch_size=64,
                source="TXT2IMG_CIFAR.md B.3-B.4 (Q-Diffusion, TFMQ-DM): DDIM 100 steps, quad skip, eta 0, 50,000 "
                       "samples, batch 64, EMA checkpoint"),
    # The CIFAR-10 protocol in miniature: the quad skip at the digits presets' 20 steps (quad-20 has no repeated
    # values; its sequence tops out at 800 like quad-100).
    ModelPreset("digits-pixel", "configs/ddim/digits-pixel.yml", "models/ddim/digits-pixel/model.ckpt",
                download=None, class_conditional=False, family="pixel", sampler="ddim", skip_type="quad",
                ddim_steps=20, eta=0.0, n_samples=1000, batch_size=100, trained_by="scripts/train_digits_pixel.py",
                source="the CIFAR-10 protocol in miniature: DDIM quad skip, 20 steps, eta 0, 1,000 samples"),
    ModelPreset("sd-v1-4", "configs/stable-diffusion/v1-inference.yaml", "models/ldm/stable-diffusion-v1/model.ckpt",
                download="sd-v1-4", class_conditional=False, conditioning="text", sampler="plms", ddim_steps=50,
                eta=0.0, scale=7.5, n_samples=10_000, batch_size=4, n_prompts=10_000, images_per_prompt=1,
                clip_tokenizer=True,
                source="TXT2IMG_CIFAR.md A.1/A.4: PLMS 50, eta 0, CFG 7.5 against \"\", 512x512 (latent 4x64x64), "
                       "10,000 COCO val2014 captions"),
    ModelPreset("digits-txt2img", "configs/stable-diffusion/digits-txt2img.yaml",
                "models/ldm/digits-txt2img/model.ckpt", download=None, class_conditional=False, conditioning="text",
                sampler="plms", ddim_steps=50, eta=0.0, scale=3.0, n_samples=1000, batch_size=100,
                trained_by="scripts/train_digits_txt2img.py", prompts="digits-heldout", images_per_prompt=50,
                calib_prompts="digits-train",
                source="SD's protocol in miniature (results/digits_txt2img_fp.md): PLMS 50, eta 0, CFG 3 against "
                       "\"\"; the 20 held-out phrasings x 50 images"),
]}


def get_preset(name) -> ModelPreset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def clip_tokenizer_dir():
    """A local folder holding openai/clip-vit-large-patch14's tokenizer (vocab.json, merges.txt): $MPQDM_CLIP_TOKENIZER,
    else models/clip/clip-vit-large-patch14, else the Hugging Face cache (never downloaded); a UserError saying how
    to get it otherwise."""
    explicit = os.environ.get(CLIP_TOKENIZER_ENV)
    candidates = [explicit] if explicit else [os.path.join(REPO_ROOT, CLIP_TOKENIZER_DIR)]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path,
                                                                                                  "merges.txt")):
            return os.path.abspath(path)
    if not explicit:
        try:
            from huggingface_hub import snapshot_download

            cached = snapshot_download(CLIP_TOKENIZER_ID, local_files_only=True,
                                       allow_patterns=["vocab.json", "merges.txt", "*.json"])
            if os.path.isfile(os.path.join(cached, "vocab.json")):
                return cached
        except Exception:  # not cached, or no hub client
            pass
    where = f"${CLIP_TOKENIZER_ENV} ({explicit})" if explicit else CLIP_TOKENIZER_DIR
    raise UserError(f"the CLIP tokenizer of {CLIP_TOKENIZER_ID} was not found in {where} or the Hugging Face cache; "
                    f"put its vocab.json and merges.txt in {CLIP_TOKENIZER_DIR} (or a folder named by "
                    f"${CLIP_TOKENIZER_ENV}), or run `python -c \"from transformers import CLIPTokenizer; "
                    f"CLIPTokenizer.from_pretrained('{CLIP_TOKENIZER_ID}')\"` once on a machine with internet")


def check_preset_files(name):
    """The preset's config, checkpoint (and SD's tokenizer) exist; one UserError sentence otherwise."""
    preset = get_preset(name)
    if not os.path.isfile(preset.config_path):
        raise UserError(f"config {preset.config_path} of preset {name!r} is missing; restore it from the repository")
    if not os.path.isfile(preset.ckpt_path):
        raise UserError(f"checkpoint {preset.ckpt_path} of preset {name!r} not found; "
                        f"{preset.missing_checkpoint_hint()}")
    if preset.clip_tokenizer:
        clip_tokenizer_dir()
    return preset


def load_preset_model(name, device="cpu"):
    """The preset's model (a LatentDiffusion or a PixelDiffusion) in eval mode on `device`, loaded safely."""
    preset = check_preset_files(name)
    return load_model(preset.family, preset.config_path, preset.ckpt_path, device=device, use_ema=preset.use_ema,
                      download_name=preset.download, clip_tokenizer=preset.clip_tokenizer)


def load_model(family, config_path, ckpt_path, device="cpu", use_ema=False, download_name=None, trust_config=False,
               clip_tokenizer=False):
    """A model of ``family`` from its config file and checkpoint, in eval mode on ``device``."""
    if family == "pixel":
        from ddim.pipeline import load_pixel_model

        return load_pixel_model(config_path, ckpt_path, device=device, download_name=download_name)
    from omegaconf import OmegaConf

    from ldm.util import load_model_from_config

    model = load_model_from_config(OmegaConf.load(config_path), ckpt_path, use_ema_weights=use_ema, device=device,
                                   download_name=download_name, trust_config=trust_config)
    if clip_tokenizer and hasattr(model.cond_stage_model, "tokenize"):
        model.cond_stage_model.version = clip_tokenizer_dir()  # the local tokenizer, never a download
    return model
