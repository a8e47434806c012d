"""Q-Diffusion (ICCV 2023) on the shared substrate: post-training, BRECQ-style reconstruction (PEERS.md §1).

Layer policy: every Conv1d / Conv2d / Linear quantized (nothing FP), one activation set for all steps, weights
per channel (`mse` for LDMs, `max` for CIFAR) with AdaRound; decoder skip 1x1 convs shortcut-split (``split``);
attention matmuls quantized (q·scale and k; softmax (unsigned, ``softmax_bits``) and v).
Pipeline (``run_ptq``): weight quantizer init -> weight stage (AdaRound, asymmetric inputs from the partially
weight-quantized model, weights only, Adam lr 1e-3, p = 2, f_reg with β 20 -> 2 after 20 % warm-up) ->
activation init (first-reach `mse` / `max`, + running statistics) -> activation stage (only activation Δ, FP
inputs, weights and activations quantized, Adam lr 4e-4 cosine to 0, p = 2.4). Resumable per unit.
"""
import time
from dataclasses import dataclass
from functools import partial

from ldm.util import UserError
from quant import adaround
from quant.activation import ActQuantizer, SoftmaxQuantizer
from quant.api import MethodHandler, QuantConfig, register_method
from quant.layers import LayerSpec
from quant.policy import rule

# Split rules per family: the decoder blocks' skip 1x1 convs (PEERS.md §1.5).
SPLIT_LAYERS = {"compvis_unet": "output_blocks.*.0.skip_connection", "ddim_model": "up.*.block.*.nin_shortcut"}

# Per-preset defaults over the config's (the paper's LDM defaults), PEERS.md §1.6; cin256-v2 has no official recipe
# (toolkit choice [T]). The calibration trajectories come from 01 (cin256-v2: DDIM 20, eta 0, CFG 3.0; bedrooms: 200
# steps, eta 1; churches: 400, eta 0; CIFAR-10: quad 100, eta 0; SD: PLMS 50).
_DIGITS = {"cali_st": 10, "cali_n": 8, "weight_iters": 300, "act_iters": 100, "weight_batch": 32, "act_batch": 32,
           "act_init_n": 64, "running_batch": 64, "micro_batch": 32}
PRESETS = {
    "cin256-v2": {"cali_st": 20, "cali_n": 256, "split": True},
    "lsun_beds256": {"cali_st": 20, "cali_n": 256, "split": False, "act_symmetric": True,
                     "act_scale_method": "max", "running_stat": True},
    "lsun_churches256": {"cali_st": 20, "cali_n": 256, "split": False},
    "cifar10": {"cali_st": 20, "cali_n": 256, "split": True, "act_symmetric": True, "weight_init": "max"},
    "sd-v1-4": {"cali_st": 25, "cali_n": 128, "split": True, "running_stat": True, "softmax_bits": 16,
                "weight_batch": 8, "act_batch": 8, "act_init_n": 16, "running_batch": 16},
    # scaled to ~2-3 CPU minutes per run on the digits LDM (W4A8, 1 thread: 135 s of CPU time, issue 12): 160 rows
    # (10 of the 50 recorded steps x 8 samples x {uncond, cond}), 300 + 100 iterations per unit, caching forwards of
    # 32 rows (the model is tiny, so per-call overhead dominates; the result is the same up to float rounding)
    "digits": dict(_DIGITS, split=True),
    "digits-txt2img": dict(_DIGITS, split=True, cali_st=10),           # 10 of the 50 PLMS steps x 8 prompts x 2
    "digits-pixel": dict(_DIGITS, split=True, act_symmetric=True, weight_init="max", cali_st=10, cali_n=16),
}


@dataclass(frozen=True)
class QDiffusionConfig(QuantConfig):
    method = "qdiffusion"
    lora_rank: int = 0
    quantize_attention_matmuls: bool = True
    weight_init: str = "mse"            # weight scale method: "mse" (LDM, SD) | "max" (CIFAR)
    act_scale_method: str = "mse"       # activation init: "mse" | "max" (the min-max option)
    act_symmetric: bool = False
    running_stat: bool = False          # EMA (momentum running_momentum) of activation ranges after the init
    split: bool = True                  # shortcut-split the decoder skip 1x1 convs
    softmax_bits: int = 8               # 16: excluded from Δ learning
    cali_st: int = 20                   # calibration steps {0, s, 2s, ...}, s = n_steps // cali_st
    cali_n: int = 256                   # samples (trajectories) per step; x2 rows with classifier-free guidance
    weight_iters: int = 20000
    weight_lr: float = 1e-3
    weight_batch: int = 32
    weight_p: float = 2.0
    round_lambda: float = 0.01
    round_warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    act_iters: int = 5000
    act_lr: float = 4e-4
    act_batch: int = 32
    act_p: float = 2.4
    act_init_n: int = 64                # rows of the first-reach activation init forward
    running_batch: int = 64
    running_momentum: float = 0.95
    micro_batch: int = 8                # rows per caching forward
    max_cache_gb: float = 8.0           # in-memory budget of one unit's cached inputs/targets (then disk)
    cache_dir: str = ""                 # "" = <run_dir>/recon/cache
    cache_dtype: str = "float32"        # "float16" halves cache memory and disk (cached inputs/targets rounded)

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.lora_rank == 0, "Q-Diffusion has no LoRA, so lora_rank must be 0"),
            (not self.smoothing, "Q-Diffusion uses no smoothing"),
            (self.act_scale_method in ("mse", "max"), "act_scale_method must be 'mse' or 'max'"),
            (_int(self.softmax_bits) and 2 <= self.softmax_bits <= 16, "softmax_bits must be an integer in 2..16"),
            (_int(self.cali_st) and self.cali_st >= 1, "cali_st must be a positive integer"),
            (_int(self.cali_n) and self.cali_n >= 1, "cali_n must be a positive integer"),
            (_int(self.weight_iters) and self.weight_iters >= 0, "weight_iters must be an integer >= 0"),
            (_int(self.act_iters) and self.act_iters >= 0, "act_iters must be an integer >= 0"),
            (all(_int(v) and v >= 1 for v in (self.weight_batch, self.act_batch, self.act_init_n,
                                              self.running_batch, self.micro_batch)),
             "weight_batch, act_batch, act_init_n, running_batch and micro_batch must be positive integers"),
            (all(_pos(v) for v in (self.weight_lr, self.act_lr, self.weight_p, self.act_p, self.max_cache_gb)),
             "weight_lr, act_lr, weight_p, act_p and max_cache_gb must be positive finite numbers"),
            (_pos(self.round_lambda) or self.round_lambda == 0, "round_lambda must be >= 0"),
            (0 <= self.round_warmup < 1, "round_warmup must be in [0, 1)"),
            (_pos(self.beta_end) and self.beta_start >= self.beta_end, "beta must decay: beta_start >= beta_end > 0"),
            (0 < self.running_momentum < 1, "running_momentum must be in (0, 1)"),
            (isinstance(self.cache_dir, str), "cache_dir must be a path string"),
            (self.cache_dtype in ("float32", "float16"), "cache_dtype must be 'float32' or 'float16'"),
        ]
        for ok, sentence in checks:
            if not ok:
                raise UserError(sentence + ".")


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _pos(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")


def preset_options(preset):
    """The Q-Diffusion defaults of a preset over the config's (plain options for make_config)."""
    if preset not in PRESETS:
        raise UserError(f"Q-Diffusion has no preset {preset!r}; known: {sorted(PRESETS)}.")
    return dict(PRESETS[preset])


@register_method("qdiffusion")
class QDiffusion(MethodHandler):
    config_class = QDiffusionConfig
    training = "ptq"

    def layer_spec(self, config, role, n_steps):
        return LayerSpec(role=role, w_bits=config.w_bits, a_bits=config.a_bits, n_steps=1, lora_rank=0,
                         smoothing=False, int_weight=False, act_per_step=False, act_symmetric=config.act_symmetric,
                         act_scale_method=config.act_scale_method, rounding="adaround")

    def policy_rules(self, config, family):
        split = [rule(SPLIT_LAYERS[family], split=True)] if config.split else []
        return split + [rule("*")]      # nothing FP (PEERS.md §1.3)

    def matmul_quantizers(self, config, kind, n_steps):
        def act():
            return ActQuantizer(config.a_bits, config.act_symmetric, config.act_scale_method)
        return [act(), act()] if kind == "qk" else [SoftmaxQuantizer(config.softmax_bits), act()]

    def preset_options(self, preset):
        return preset_options(preset)

    def init_weights(self, layer, x, config):
        raise UserError("Q-Diffusion is calibrated by quant.reconstruct.run_ptq, not by the naive calibration stage.")

    # ------------------------------------------------------------------------------------------ pipeline
    def objectives(self, config):
        """(weight-stage objective, activation-stage objective) of Q-Diffusion."""
        from quant.reconstruct.objectives import ActivationDeltas, AdaRoundWeights, Objective
        schedule = partial(adaround.RoundingSchedule, weight=config.round_lambda, warmup=config.round_warmup,
                           beta_start=config.beta_start, beta_end=config.beta_end)
        weight = Objective([AdaRoundWeights(config.weight_lr, "constant", schedule, split_reg="main_only")],
                           p=config.weight_p, input_source="quantized", act_quant=False, inputs_act_quant=False)
        act = Objective([ActivationDeltas(config.act_lr, "cosine", max_bits=15)], p=config.act_p,
                        input_source="fp", act_quant=True)
        return weight, act

    def run_ptq(self, session):
        """Run the weight stage, the activation init and the activation stage on a PTQSession (resumable)."""
        from quant.reconstruct.act_init import init_act_quantizers, running_stats
        config, times = session.config, {}
        weight_obj, act_obj = self.objectives(config)
        session.init_weight_quantizers(config.weight_init)
        session.restore()
        start = time.perf_counter()
        session.stage("weight", lambda unit: weight_obj, config.weight_iters, config.weight_batch)
        times["weight_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if not session.done("act_init"):
            ranges = init_act_quantizers(session.q, session.rows, config.act_init_n, config.seed, session.device)
            if config.running_stat:
                running_stats(session.q, session.rows, ranges, config.running_batch, config.running_momentum,
                              config.seed, session.device)
            session.commit_act_init()
        times["act_init_s"] = time.perf_counter() - start
        start = time.perf_counter()
        session.stage("act", lambda unit: act_obj, config.act_iters, config.act_batch)
        times["act_s"] = time.perf_counter() - start
        session.log["times"] = times
        return session.finish()
