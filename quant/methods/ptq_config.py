"""What every post-training method's config shares (PEERS.md §1): calibration-row selection, AdaRound, activation
init, the streamed reconstruction cache. Q-Diffusion and TFMQ-DM subclass it with their own stages' options."""
from dataclasses import dataclass
from typing import ClassVar

from ldm.util import UserError
from quant.activation import ActQuantizer, SoftmaxQuantizer
from quant.api import QuantConfig
from quant.layers import LayerSpec


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_pos(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")


@dataclass(frozen=True)
class PTQConfig(QuantConfig):
    label: ClassVar[str] = ""           # the method's name in error sentences
    unused: ClassVar[tuple] = ()        # shared options the method ignores (quant_scripts/02 refuses them)
    lora_rank: int = 0
    quantize_attention_matmuls: bool = True
    weight_init: str = "mse"            # per-channel weight scales: "mse" (LDM, SD) | "max" (CIFAR)
    act_scale_method: str = "mse"       # activation init: "mse" | "max" (the min-max option)
    softmax_bits: int = 8               # unsigned softmax quantizer
    cali_st: int = 20                   # calibration steps {0, s, 2s, ...}, s = recorded steps // cali_st
    cali_n: int = 256                   # trajectories per step; x2 rows with classifier-free guidance
    weight_iters: int = 20000           # AdaRound iterations per unit
    weight_lr: float = 1e-3
    weight_batch: int = 32
    weight_p: float = 2.0
    round_lambda: float = 0.01
    round_warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    act_init_n: int = 64                # rows of an activation-init forward
    running_batch: int = 64             # rows per running-statistics (EMA) batch
    running_momentum: float = 0.95
    micro_batch: int = 8                # rows per caching forward
    max_cache_gb: float = 8.0           # in-memory budget of one unit's cached inputs/targets (then disk)
    cache_dir: str = ""                 # "" = <run_dir>/recon/cache
    cache_dtype: str = "float32"        # "float16" halves cache memory and disk (cached inputs/targets rounded)

    def checks(self):
        """(ok, sentence) pairs validated on construction; a subclass extends the list with its own options."""
        return [
            (self.lora_rank == 0, f"{self.label} has no LoRA, so lora_rank must be 0"),
            (not self.smoothing, f"{self.label} uses no smoothing"),
            (self.act_scale_method in ("mse", "max", "search"), "act_scale_method must be 'mse', 'max' or 'search'"),
            (is_int(self.softmax_bits) and 2 <= self.softmax_bits <= 16, "softmax_bits must be an integer in 2..16"),
            (is_int(self.cali_st) and self.cali_st >= 1, "cali_st must be a positive integer"),
            (is_int(self.cali_n) and self.cali_n >= 1, "cali_n must be a positive integer"),
            (is_int(self.weight_iters) and self.weight_iters >= 0, "weight_iters must be an integer >= 0"),
            (all(is_int(v) and v >= 1 for v in (self.weight_batch, self.act_init_n, self.running_batch,
                                                self.micro_batch)),
             "weight_batch, act_init_n, running_batch and micro_batch must be positive integers"),
            (all(is_pos(v) for v in (self.weight_lr, self.weight_p, self.max_cache_gb)),
             "weight_lr, weight_p and max_cache_gb must be positive finite numbers"),
            (is_pos(self.round_lambda) or self.round_lambda == 0, "round_lambda must be >= 0"),
            (0 <= self.round_warmup < 1, "round_warmup must be in [0, 1)"),
            (is_pos(self.beta_end) and self.beta_start >= self.beta_end, "beta must decay: beta_start >= beta_end > 0"),
            (0 < self.running_momentum < 1, "running_momentum must be in (0, 1)"),
            (isinstance(self.cache_dir, str), "cache_dir must be a path string"),
            (self.cache_dtype in ("float32", "float16"), "cache_dtype must be 'float32' or 'float16'"),
        ]

    def __post_init__(self):
        super().__post_init__()
        for ok, sentence in self.checks():
            if not ok:
                raise UserError(sentence + ".")


def preset_lookup(presets, preset, label):
    """A method's defaults for a model preset (plain options for make_config)."""
    if preset not in presets:
        raise UserError(f"{label} has no preset {preset!r}; known: {sorted(presets)}.")
    return dict(presets[preset])


def ptq_layer_spec(config, role, n_steps=1, act_symmetric=False):
    """The default layer of a post-training method: AdaRound weights, no LoRA or smoothing, one activation set (a
    policy rule may still ask for per-step sets); ``n_steps`` sizes the per-step sets where a rule asks for them."""
    return LayerSpec(role=role, w_bits=config.w_bits, a_bits=config.a_bits, n_steps=n_steps, lora_rank=0,
                     smoothing=False, int_weight=False, act_per_step=False, act_symmetric=act_symmetric,
                     act_scale_method=config.act_scale_method, rounding="adaround")


def one_set_matmul_quantizers(config, kind, symmetric=False):
    """Attention-matmul input quantizers with one set for all steps: q and k, or the unsigned softmax and v."""
    def act():
        return ActQuantizer(config.a_bits, symmetric, config.act_scale_method)
    return [act(), act()] if kind == "qk" else [SoftmaxQuantizer(config.softmax_bits), act()]
