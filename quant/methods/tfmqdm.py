"""TFMQ-DM (CVPR 2024) on the shared post-training substrate (PEERS.md §3): the time-step embedding path is
data-independent, so it is reconstructed on its own (TIAR) and its activations get one parameter set per sampling
step (FSC).

Layer policy (§3.3): FP: the input conv, the output conv, ``time_embed.0`` and every skip / op / shortcut conv (DDIM:
also the downsample convs), so shortcut splitting is never reached; ``time_embed.2`` and the first ResBlock conv
keep their input unquantized; everything else, attention matmuls included (softmax unsigned), is quantized with
per-channel AdaRound weights and per-tensor activations. The class-label embedding is never quantized.
Pipeline (``run_ptq``, resumable): weight quantizer init (``mse``) -> TIAR: AdaRound on the Temporal Information
Block's linears against the FP embeddings (quant.reconstruct.tib) when the time embedding is reached -> block /
layer reconstruction (AdaRound, asymmetric inputs, weights only, p = 2, split halves regularised by channel share),
the ResBlocks leaving their embedding linears (already rounded by TIAR) out of their rounding variables and f_reg
-> FSC (quant.reconstruct.fsc): MSE init + EMA min-max, one set per step for the TIB's activation quantizers
(``fsc="paper"``) or for all of them (``"released"``); ``"off"`` = one set everywhere (the ablation). No
activation-Δ learning. Weights use cali_st of the recorded steps (TFMQ-DM's interval_length); FSC uses every step.
"""
from dataclasses import dataclass
from functools import partial

from ldm.util import UserError
from quant import adaround
from quant.activation import TemporalActQuantizer, TemporalSoftmaxQuantizer
from quant.api import MethodHandler, register_method
from quant.methods.ptq_config import PTQConfig, is_int, one_set_matmul_quantizers, preset_lookup, ptq_layer_spec
from quant.policy import rule

FSC_VARIANTS = ("paper", "released", "off")

# Per-preset defaults over the config's (PEERS.md §3.4). Calibration data comes from 01 on the sampling schedule
# (--calib_data fresh_per_step: a fresh FP run per step); cali_st = steps / interval_length.
_SETS = {"act_init_n": 16, "running_batch": 16}          # FSC: MSE init on 16 rows of a step, EMA in batches of 16
# digits: the Q-Diffusion preset's budget (300 iterations per unit, 160 weight rows: 10 of the 20 steps x 8 x 2);
# FSC on all 20 steps x 8 trajectories x {uncond, cond} = 16 rows per step
_DIGITS = dict(_SETS, cali_st=10, cali_n=8, fsc_n=8, weight_iters=300, tiar_iters=300, weight_batch=32,
               tiar_batch=32, micro_batch=32)
PRESETS = {
    # ImageNet: all 20 DDIM steps (interval 1); 256 trajectories x {cond, uncond} = 512 rows per step
    "cin256-v2": dict(_SETS, cali_st=20, cali_n=256, fsc_n=256),
    "lsun_beds256": dict(_SETS, cali_st=20, cali_n=256, fsc_n=256),     # 200 steps, interval 10
    "lsun_churches256": dict(_SETS, cali_st=16, cali_n=256, fsc_n=256),  # 400 steps, interval 25
    "cifar10": dict(_SETS, cali_st=20, cali_n=256, fsc_n=256),          # quad-100, interval 5
    # SD: all 50 PLMS steps, 128 captions x {cond, uncond}; batch 8 (single GPU)
    "sd-v1-4": dict(_SETS, cali_st=50, cali_n=128, fsc_n=128, weight_batch=8, tiar_batch=8),
    "digits": _DIGITS,
    "digits-txt2img": dict(_DIGITS, cali_st=10),                        # 10 of the 50 PLMS steps for the weights
    "digits-pixel": dict(_DIGITS, cali_n=16, fsc_n=16),
}


@dataclass(frozen=True)
class TFMQDMConfig(PTQConfig):
    method = "tfmqdm"
    label = "TFMQ-DM"
    fsc: str = "paper"                  # per-step sets: "paper" (TIB only) | "released" (all) | "off" (none)
    tiar: bool = True                   # reconstruct the Temporal Information Block first, on its own
    fsc_n: int = 256                    # trajectories per step for FSC (every recorded step)
    tiar_iters: int = 20000
    tiar_batch: int = 32
    act_init_n: int = 16                # FSC: rows of a set's MSE-init forward
    running_batch: int = 16             # FSC: rows per EMA batch

    def checks(self):
        return super().checks() + [
            (self.fsc in FSC_VARIANTS, f"fsc must be one of {', '.join(FSC_VARIANTS)}, got {self.fsc!r}"),
            (isinstance(self.tiar, bool), "tiar must be a boolean (on / off)"),
            (self.fsc != "released" or self.softmax_bits <= 8,
             "the released FSC variant keeps per-step softmax sets of at most 8 bits, so softmax_bits must be <= 8"),
            (is_int(self.fsc_n) and self.fsc_n >= 1, "fsc_n must be a positive integer"),
            (is_int(self.tiar_iters) and self.tiar_iters >= 0, "tiar_iters must be an integer >= 0"),
            (is_int(self.tiar_batch) and self.tiar_batch >= 1, "tiar_batch must be a positive integer"),
        ]


def preset_options(preset):
    """The TFMQ-DM defaults of a preset over the config's (plain options for make_config)."""
    return preset_lookup(PRESETS, preset, "TFMQ-DM")


def policy_rules(fsc, family):
    """TFMQ-DM's layer policy (PEERS.md §3.3) with per-step activation sets where ``fsc`` puts them."""
    tib, every = fsc != "off", fsc == "released"
    if family == "compvis_unet":
        fixed = [rule(n, required=True, fp=True) for n in ("time_embed.0", "input_blocks.0.0", "out.2")]
        return fixed + [rule("*.skip_connection", fp=True), rule("*.op", fp=True),
                        rule("time_embed.2", required=True, act_quant=False),
                        rule("input_blocks.1.0.in_layers.2", act_quant=False),
                        rule("*.emb_layers.1", act_per_step=tib), rule("*", act_per_step=every)]
    if family == "ddim_model":
        fixed = [rule(n, required=True, fp=True) for n in ("temb.dense.0", "conv_in", "conv_out")]
        return fixed + [rule("*shortcut", fp=True), rule("*.downsample.conv", fp=True),
                        rule("temb.dense.1", required=True, act_quant=False),
                        rule("down.0.block.0.conv1", act_quant=False),
                        rule("*.temb_proj", act_per_step=tib), rule("*", act_per_step=every)]
    raise UserError(f"TFMQ-DM has no layer policy for {family} models.")


@register_method("tfmqdm")
class TFMQDM(MethodHandler):
    config_class = TFMQDMConfig
    training = "ptq"

    def layer_spec(self, config, role, n_steps):
        return ptq_layer_spec(config, role, n_steps)

    def policy_rules(self, config, family):
        return policy_rules(config.fsc, family)

    def matmul_quantizers(self, config, kind, n_steps):
        if config.fsc != "released":
            return one_set_matmul_quantizers(config, kind)

        def act():
            return TemporalActQuantizer(config.a_bits, n_steps, False, config.act_scale_method)
        return [act(), act()] if kind == "qk" else [TemporalSoftmaxQuantizer(config.softmax_bits, n_steps), act()]

    def preset_options(self, preset, **_):
        return preset_options(preset)

    def init_weights(self, layer, x, config):
        raise UserError("TFMQ-DM is calibrated by quant.reconstruct.run_ptq, not by the naive calibration stage.")

    # ------------------------------------------------------------------------------------------ pipeline
    def objectives(self, config, family):
        """(TIAR objective, block objective) of TFMQ-DM."""
        from quant.reconstruct.objectives import AdaRoundWeights, Objective
        from quant.reconstruct.tib import embedding_patterns
        schedule = partial(adaround.RoundingSchedule, weight=config.round_lambda, warmup=config.round_warmup,
                           beta_start=config.beta_start, beta_end=config.beta_end)

        def weights(exclude=()):
            return Objective([AdaRoundWeights(config.weight_lr, "constant", schedule, exclude=exclude,
                                              split_reg="channel_share")],
                             p=config.weight_p, input_source="quantized", act_quant=False, inputs_act_quant=False)
        return weights(), weights(embedding_patterns(family) if config.tiar else ())

    def plan(self, units, qunet, config):
        """(TIB unit or None, the other units): with TIAR the TIB takes the place of the lone time-MLP layers."""
        from quant.reconstruct.tib import STRUCTURE, tib_unit
        if not config.tiar:
            return None, list(units)
        family = qunet.policy["family"]
        time_mlp = set(STRUCTURE[family]["time_mlp"])
        return tib_unit(family), [u for u in units if not (u.kind == "layer" and u.name in time_mlp)]

    def check_calibration(self, calib, config, timesteps):
        """FSC's rows exist and, with per-step sets, cover every timestep of the schedule (checked before anything
        is written or reconstructed, not after hours of it)."""
        from quant.reconstruct.fsc import check_coverage, fsc_rows
        from quant.step import StepTable
        rows = fsc_rows(calib, config.fsc_n)
        if config.fsc != "off":
            check_coverage(rows.t, StepTable(timesteps))

    def run_ptq(self, session):
        """TIAR, block reconstruction and FSC on a PTQSession (resumable per unit and stage)."""
        from quant.reconstruct.fsc import calibrate_sets, fsc_rows
        config, family = session.config, session.family
        calib = getattr(session, "calib", None)
        if calib is None:
            raise ValueError("TFMQ-DM needs the loaded calib.pt on the session (quant.reconstruct.run_ptq sets it)")
        rows = fsc_rows(calib, config.fsc_n)
        tiar_obj, block_obj = self.objectives(config, family)
        tib, blocks = self.plan(session.units, session.qunet, config)
        session.units = ([tib] if tib is not None else []) + blocks
        session.init_weight_quantizers(config.weight_init)
        session.restore()
        with session.timed("tiar_s"):
            if tib is not None:
                session.stage("tiar", lambda unit: tiar_obj, config.tiar_iters, config.tiar_batch, units=[tib])
        with session.timed("weight_s"):
            session.stage("weight", lambda unit: block_obj, config.weight_iters, config.weight_batch, units=blocks)
        with session.timed("fsc_s"):
            if not session.done("fsc"):
                session.log["fsc"] = calibrate_sets(session.q, rows, session.qunet.table, config.act_init_n,
                                                    config.running_batch, config.running_momentum, config.seed,
                                                    session.device)
                session.commit_act_init("fsc")
        return session.finish()
