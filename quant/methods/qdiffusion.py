"""Q-Diffusion (ICCV 2023) on the shared substrate: post-training, BRECQ-style reconstruction (PEERS.md §1).

Layer policy: every Conv1d / Conv2d / Linear quantized (nothing FP), one activation set for all steps, weights
per channel (`mse` for LDMs, `max` for CIFAR) with AdaRound; decoder skip 1x1 convs shortcut-split (``split``);
attention matmuls quantized (q·scale and k; softmax (unsigned, ``softmax_bits``) and v).
Pipeline (``run_ptq``): weight quantizer init -> weight stage (AdaRound, asymmetric inputs from the partially
weight-quantized model, weights only, Adam lr 1e-3, p = 2, f_reg with β 20 -> 2 after 20 % warm-up) ->
activation init (first-reach `mse` / `max`, + running statistics) -> activation stage (only activation Δ, FP
inputs, weights and activations quantized, Adam lr 4e-4 cosine to 0, p = 2.4). Resumable per unit.
"""
from dataclasses import dataclass
from functools import partial

from ldm.util import UserError
from quant import adaround
from quant.api import MethodHandler, register_method
from quant.methods.ptq_config import (PTQConfig, is_int, is_pos, one_set_matmul_quantizers, preset_lookup,
                                      ptq_layer_spec)
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
class QDiffusionConfig(PTQConfig):
    method = "qdiffusion"
    label = "Q-Diffusion"
    act_symmetric: bool = False
    running_stat: bool = False          # EMA (momentum running_momentum) of activation ranges after the init
    split: bool = True                  # shortcut-split the decoder skip 1x1 convs
    act_iters: int = 5000               # activation-Δ (LSQ) stage; a 16-bit softmax is left out of it
    act_lr: float = 4e-4
    act_batch: int = 32
    act_p: float = 2.4

    def checks(self):
        return super().checks() + [
            (is_int(self.act_iters) and self.act_iters >= 0, "act_iters must be an integer >= 0"),
            (is_int(self.act_batch) and self.act_batch >= 1, "act_batch must be a positive integer"),
            (is_pos(self.act_lr) and is_pos(self.act_p), "act_lr and act_p must be positive finite numbers"),
        ]


def preset_options(preset):
    """The Q-Diffusion defaults of a preset over the config's (plain options for make_config)."""
    return preset_lookup(PRESETS, preset, "Q-Diffusion")


@register_method("qdiffusion")
class QDiffusion(MethodHandler):
    config_class = QDiffusionConfig
    training = "ptq"

    def layer_spec(self, config, role, n_steps):
        return ptq_layer_spec(config, role, act_symmetric=config.act_symmetric)

    def policy_rules(self, config, family):
        split = [rule(SPLIT_LAYERS[family], split=True)] if config.split else []
        return split + [rule("*")]      # nothing FP (PEERS.md §1.3)

    def matmul_quantizers(self, config, kind, n_steps):
        return one_set_matmul_quantizers(config, kind, config.act_symmetric)

    def preset_options(self, preset, **_):
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
        config = session.config
        weight_obj, act_obj = self.objectives(config)
        session.init_weight_quantizers(config.weight_init)
        session.restore()
        with session.timed("weight_s"):
            session.stage("weight", lambda unit: weight_obj, config.weight_iters, config.weight_batch)
        with session.timed("act_init_s"):
            if not session.done("act_init"):
                ranges = init_act_quantizers(session.q, session.rows, config.act_init_n, config.seed, session.device)
                if config.running_stat:
                    running_stats(session.q, session.rows, ranges, config.running_batch, config.running_momentum,
                                  config.seed, session.device)
                session.commit_act_init()
        with session.timed("act_s"):
            session.stage("act", lambda unit: act_obj, config.act_iters, config.act_batch)
        return session.finish()
