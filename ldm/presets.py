"""Named model presets: which config and checkpoint a name means, and the paper's sampling settings for it.

Scripts accept `--preset NAME` instead of `--config/--ckpt`; the sampling defaults are those of the
evaluation protocol (EVALUATION.md sections 1-2) so that a preset run is comparable with the published tables.
Paths are relative to the repository root and resolved from this file, so scripts work from any directory.
"""
import os
from dataclasses import dataclass
from typing import Optional

from ldm.util import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class ModelPreset:
    name: str
    config: str  # relative to the repository root
    ckpt: str
    download: Optional[str]  # argument of scripts/download_models.sh; None for the shipped digits model
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

    @property
    def config_path(self):
        return os.path.join(REPO_ROOT, self.config)

    @property
    def ckpt_path(self):
        return os.path.join(REPO_ROOT, self.ckpt)

    @property
    def samples_per_class(self):
        return self.n_samples // self.n_classes if self.class_conditional else None

    def sampling_defaults(self):
        return dict(sampler=self.sampler, ddim_steps=self.ddim_steps, eta=self.eta, scale=self.scale,
                    n_samples=self.n_samples, batch_size=self.batch_size)


PRESETS = {p.name: p for p in [
    ModelPreset("digits", "configs/latent-diffusion/digits-ldm-vq-4.yaml", "models/ldm/digits-ldm-vq-4/model.ckpt",
                download=None, class_conditional=True, n_classes=10, null_class=10, ddim_steps=20, eta=0.0,
                scale=3.0, n_samples=1000, batch_size=100,
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
]}


def get_preset(name) -> ModelPreset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def load_preset_model(name, device="cpu"):
    """The preset's LatentDiffusion in eval mode on `device`, loaded with the safe loader."""
    from omegaconf import OmegaConf

    from ldm.util import load_model_from_config

    preset = get_preset(name)
    if not os.path.isfile(preset.config_path):
        raise UserError(f"config {preset.config_path} of preset {name!r} is missing; restore it from the repository")
    if not os.path.isfile(preset.ckpt_path):
        if preset.download is None:
            raise UserError(f"checkpoint {preset.ckpt_path} of preset {name!r} not found; recreate it with "
                            f"`python scripts/train_digits_ldm.py`")
        raise UserError(f"checkpoint {preset.ckpt_path} of preset {name!r} not found; download it with "
                        f"`bash scripts/download_models.sh {preset.download}`")
    config = OmegaConf.load(preset.config_path)
    return load_model_from_config(config, preset.ckpt_path, use_ema_weights=preset.use_ema, device=device,
                                  download_name=preset.download)
