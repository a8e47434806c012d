"""One entry point, ``quantize_(unet, config, timesteps)``: a method is a frozen, validated config dataclass
plus a registered handler (torchao style), so adding a method changes no existing code.

The returned ``QuantUNet`` wraps the UNet (same forward signature) and owns the timestep table: every call
resolves its step index k from the actual timestep values and runs the UNet inside ``step_scope(k)`` (a model
without per-step quantizers, e.g. Q-Diffusion's, needs no index and runs at any timestep). Which layers are
wrapped, and how, is the method's layer policy for the model's family (quant.policy), recorded in ``meta()``.
"""
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ldm.util import UserError, atomic_save
from quant.activation import TemporalActQuantizer
from quant.layers import LayerSpec, QuantLayer, QuantMatMul, wrap_layer
from quant.policy import MPQDM_RULES, attention_matmuls, model_family, resolve
from quant.step import StepTable, step_scope

_METHODS = {}


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class QuantConfig:
    """Options every method shares. Subclasses set the method's defaults and add its own switches."""
    method: ClassVar[str] = ""
    w_bits: int = 4
    a_bits: int = 8
    lora_rank: int = 32
    conv_lora: str = "per_position"           # "per_position" (MPQ-DM) | "shared_b" (EfficientDM)
    quantize_attention_matmuls: bool = False
    weight_init: str = "mse"                  # "mse" | "max"
    smoothing: bool = False
    smoothing_alpha: float = 0.5
    seed: int = 0                             # LoRA A init

    def weight_bit_groups(self):
        """The weight bit widths a layer of this method may use (validated to lie in 1..8)."""
        return (self.w_bits,)

    def __post_init__(self):
        def need(cond, sentence):
            if not cond:
                raise UserError(sentence)
        for name in ("w_bits", "a_bits", "lora_rank", "seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}.")
        need(2 <= self.a_bits <= 8, f"activation bits must be between 2 and 8, got {self.a_bits}.")
        groups = self.weight_bit_groups()
        need(all(1 <= b <= 8 for b in groups),
             f"method {self.method!r} at w_bits={self.w_bits} needs weight bit groups {list(groups)}, "
             "each of which must be between 1 and 8.")
        need(self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}.")
        need(self.conv_lora in ("per_position", "shared_b"),
             f"conv_lora must be 'per_position' or 'shared_b', got {self.conv_lora!r}.")
        need(self.weight_init in ("mse", "max", "search"),
             f"weight_init must be 'mse', 'max' or 'search', got {self.weight_init!r}.")
        need(0.0 < self.smoothing_alpha < 1.0, f"smoothing_alpha must be in (0, 1), got {self.smoothing_alpha}.")


class MethodHandler:
    """What a method tells the substrate. Subclasses override the hooks they change."""
    config_class = QuantConfig
    train_weight_zero = True      # whether the weight quantizers' z is trained (lr 1e-6) or frozen
    training = "finetune"         # "finetune" (03 trains it) | "ptq" (calibrated and reconstructed in 02; 03 refuses)

    def layer_spec(self, config, role, n_steps):
        return LayerSpec(role=role, w_bits=config.w_bits, a_bits=config.a_bits, n_steps=n_steps,
                         lora_rank=config.lora_rank, conv_lora=config.conv_lora,
                         smoothing=config.smoothing, int_weight=False)

    def policy_rules(self, config, family):
        """The layer policy table (quant.policy rules) of this method for a model family."""
        if family not in MPQDM_RULES:
            raise UserError(f"method {config.method!r} has no layer policy for {family} models.")
        return MPQDM_RULES[family]

    def policy_for(self, config, family, unet):
        """The rules ``quantize_`` applies to this UNet; a method whose policy names model-dependent layers (EDA-DM:
        the second-to-last layer) overrides this. The artifact records the result, so loading needs no model."""
        return self.policy_rules(config, family)

    def preset_options(self, preset, **context):
        """A post-training method's defaults for a model preset (context: w_bits, a_bits, release)."""
        raise UserError(f"method {self.config_class.method!r} has no per-preset reconstruction defaults.")

    def matmul_quantizers(self, config, kind, n_steps):
        """The two input quantizers of an attention matmul (kind "qk" or "av"): temporal, a_bits."""
        return [TemporalActQuantizer(config.a_bits, n_steps) for _ in range(2)]

    def init_weights(self, layer, x, config):
        """Set the layer's weight quantizer (and bit buffer) from its calibration input; return a log dict."""
        raise NotImplementedError

    def lora_lr_delta(self, layer):
        """avg_Δ of the scale-aware LoRA learning rate avg_Δ/2500 (§9)."""
        return layer.weight_quantizer.delta.detach().mean().item()


def register_method(name):
    """Class decorator: registers a handler class (with a ``config_class`` attribute) under ``name``."""
    def deco(handler_cls):
        cfg = handler_cls.config_class
        if cfg.method != name:
            raise ValueError(f"config class {cfg.__name__} declares method {cfg.method!r}, not {name!r}")
        _METHODS[name] = (cfg, handler_cls())
        return handler_cls
    return deco


def _ensure_methods_loaded():
    import quant.methods.edadm  # noqa: F401  (registration side effect)
    import quant.methods.efficientdm  # noqa: F401
    import quant.methods.mpqdm  # noqa: F401
    import quant.methods.qdiffusion  # noqa: F401
    import quant.methods.tfmqdm  # noqa: F401


def get_method(name):
    """(config class, handler) for a registered method name."""
    _ensure_methods_loaded()
    if name not in _METHODS:
        raise UserError(f"unknown quantization method {name!r}; known: {sorted(_METHODS)}.")
    return _METHODS[name]


def make_config(method, **options):
    """Build a method's validated config from plain options (unknown options are a UserError)."""
    cfg_cls, _ = get_method(method)
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"method {method!r} has no option {unknown[0]!r}.")
    return cfg_cls(**options)


def config_to_dict(config):
    return {"method": config.method, **dataclasses.asdict(config)}


def config_from_dict(d):
    d = dict(d)
    return make_config(d.pop("method"), **d)


# ----------------------------------------------------------------------------------------------- wrapper
class QuantUNet(nn.Module):
    """The quantized UNet. forward(x, timesteps, context=None, **kw) as UNetModel; k = table[timesteps]."""

    def __init__(self, unet, config, timesteps, policy=None):
        super().__init__()
        self.unet = unet
        self.config = config
        self.policy = policy            # {"family": ..., "rules": [...]} as applied by quantize_
        self.table = StepTable(timesteps)
        # a model without per-step quantizers runs the same at every timestep: no schedule lookup
        self.per_step = any(isinstance(m, TemporalActQuantizer) for m in unet.modules())
        self.register_buffer("timesteps", torch.tensor(self.table.timesteps, dtype=torch.long))
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_table())

    def _sync_table(self):
        self.table = StepTable(self.timesteps.cpu())

    def forward(self, x, timesteps=None, context=None, **kwargs):
        if context is not None:
            kwargs["context"] = context          # the DDIM Model's forward takes no context argument
        with step_scope(self.table.lookup(timesteps) if self.per_step else None):
            return self.unet(x, timesteps, **kwargs)

    def quant_layers(self):
        """(name, layer) of every wrapped conv/linear, in module order (names relative to the UNet)."""
        return [(n, m) for n, m in self.unet.named_modules() if isinstance(m, QuantLayer)]

    def quant_matmuls(self):
        return [(n, m) for n, m in self.unet.named_modules() if isinstance(m, QuantMatMul)]

    def meta(self):
        """Plain-type description from which ``build_from_meta`` re-creates this structure."""
        _, handler = get_method(self.config.method)
        return {"method": self.config.method, "config": config_to_dict(self.config),
                "w_bits": self.config.w_bits, "a_bits": self.config.a_bits,
                "timesteps": list(self.table.timesteps), "training": handler.training, "per_step": self.per_step,
                "policy": self.policy}


def set_submodule(root, name, new):
    """Replace the submodule at dotted ``name`` of ``root`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_(unet, config, timesteps, policy=None):
    """Swap the UNet's layers in place according to the policy and return the wrapping QuantUNet.

    timesteps: the sampling schedule (one entry per step; its length S sizes the temporal quantizers).
    policy: {"family", "rules"} to apply (an artifact's recorded policy); None = the method's table for the
    model's family (quant.policy). Every quantizer, split halves included, is created here from the structure;
    scales are set by calibration / reconstruction or by loading a state dict.
    """
    if not isinstance(config, QuantConfig):
        raise UserError(f"expected a QuantConfig, got {type(config).__name__}.")
    _, handler = get_method(config.method)
    table = StepTable(timesteps)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)  # LoRA A is drawn on the CPU, then moved
    if policy is None:
        family = model_family(unet)
        policy = {"family": family, "rules": handler.policy_for(config, family, unet)}
    policy = {"family": policy["family"], "rules": [dict(r) for r in policy["rules"]]}
    for name, fields in resolve(unet, policy["rules"], policy["family"]).items():
        if fields is None:
            continue
        spec = dataclasses.replace(handler.layer_spec(config, fields.get("role", "quant"), len(table)), **fields)
        set_submodule(unet, name, wrap_layer(unet.get_submodule(name), spec, generator))
    if config.quantize_attention_matmuls:
        device = next(unet.parameters()).device
        for name in attention_matmuls(unet):
            kind = "qk" if name.endswith("qk_matmul") else "av"
            quantizers = [q.to(device) for q in handler.matmul_quantizers(config, kind, len(table))]
            set_submodule(unet, name, QuantMatMul(unet.get_submodule(name), quantizers))
    return QuantUNet(unet, config, table.timesteps, policy)


def build_from_meta(unet, meta):
    """Re-create the quantized structure recorded in an artifact's meta (for load_state_dict; no forward)."""
    return quantize_(unet, config_from_dict(meta["config"]), meta["timesteps"], meta.get("policy"))


def save_quantized(qunet, path, extra_meta=None):
    """Write {"meta": ..., "state_dict": ...} atomically (loadable with weights_only=True)."""
    meta = {**qunet.meta(), **(extra_meta or {})}
    atomic_save({"meta": meta, "state_dict": qunet.state_dict()}, path)


def load_quantized(unet, path, map_location="cpu"):
    """Wrap a freshly built FP UNet per the file's meta and load its state dict; returns (qunet, meta)."""
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or "meta" not in obj or "state_dict" not in obj:
        raise UserError(f"{path} is not a quantized-model artifact (expected 'meta' and 'state_dict').")
    qunet = build_from_meta(unet, obj["meta"])
    qunet.load_state_dict(obj["state_dict"])
    return qunet, obj["meta"]


@torch.no_grad()
def convert_schedule(qunet, new_timesteps):
    """Keep the temporal entries whose timestep keys appear in ``new_timesteps`` (e.g. 100 -> 20 steps)."""
    old = qunet.table.timesteps
    missing = [t for t in new_timesteps if int(t) not in old]
    if missing:
        raise UserError(f"timestep {missing[0]} of the new schedule is not in the model's schedule {old}.")
    idx = torch.tensor([old.index(int(t)) for t in new_timesteps], dtype=torch.long)
    from quant.activation import TemporalActQuantizer
    for m in qunet.modules():
        if isinstance(m, TemporalActQuantizer):
            m.delta = nn.Parameter(m.delta.detach()[idx.to(m.delta.device)].clone(), m.delta.requires_grad)
            m.zero = nn.Parameter(m.zero.detach()[idx.to(m.zero.device)].clone(), m.zero.requires_grad)
    qunet.timesteps = torch.tensor([int(t) for t in new_timesteps], dtype=torch.long, device=qunet.timesteps.device)
    qunet._sync_table()
    return qunet
