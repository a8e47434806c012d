"""EDA-DM (arXiv 2401.04585) on the shared post-training substrate (PEERS.md §2): TDAC chooses the calibration
samples, FBR reconstructs each block with layer losses, QDrop and weights and activations learned jointly.

Layer policy (§2.2): every Conv1d / Conv2d / Linear quantized with per-channel AdaRound weights and per-tensor
activations (one set for all steps), both initialised by the "symmetric" range search; 8-bit weights for the first
weight quantizer (``time_embed.0``; DDIM ``temb.dense.0``) and the last (the output conv), whose input is not
quantized; the second-to-last quantized layer in registration order takes 8-bit activations (both halves when
split); decoder skip 1x1 convs shortcut-split; attention matmuls quantized (softmax unsigned).
Pipeline (``run_ptq``, resumable): TDAC selection (quant.calib_tdac; ``tdac=False``: uniform steps) -> weight
quantizer init (range search) -> activation init (range search, EMA 0.9 over all rows in batches) -> FBR per unit
(quant.reconstruct.fbr): AdaRound V (Adam lr_w) + activation Δ (Adam lr_a), cosine to 0, no f_reg, QDrop p on the
activations and the unit's inputs, loss = block + add_loss · layer losses; hard rounding at the end.
"""
from dataclasses import dataclass
from typing import ClassVar

from ldm.util import UserError
from quant.api import MethodHandler, register_method
from quant.methods.ptq_config import (PTQConfig, is_int, is_pos, one_set_matmul_quantizers, preset_lookup,
                                      ptq_layer_spec)
from quant.methods.qdiffusion import SPLIT_LAYERS
from quant.policy import first_rule, rule

RELEASES = ("2025", "2024")
# W8 weights and the unquantized output-conv input (PEERS.md §2.2), per family
FIRST_LAST = {"compvis_unet": ("time_embed.0", "out.2"), "ddim_model": ("temb.dense.0", "conv_out")}

# Per-preset recipes, the 2025 scripts (PEERS.md §2.4): TDAC (N, λ, r), FBR iterations / batch, activation-init
# batch, and (lr_w, lr_a, add_loss) at W8A8 and at W4A8; any other precision takes the W4A8 set when its weights
# are below 8 bits [T]. Calibration trajectories come from 01 (cin256-v2: DDIM 20, eta 0, CFG 3.0, 16 batches of 64;
# bedrooms 200 steps eta 1, churches 500 steps eta 0, CIFAR-10 quad-100 eta 0 (one batch of 1024), SD PLMS 50 CFG 7.5).
_LDM = {"tdac_n": 1024, "weight_batch": 32, "running_batch": 32, "running_momentum": 0.9, "weight_init": "search",
        "act_scale_method": "search"}
RECIPES = {
    "cin256-v2": dict(_LDM, tdac_lambda=1.2, tdac_radius=3.0, weight_iters=1000,
                      w8a8=(1e-4, 1e-3, 0.8), w4a8=(5e-1, 1e-4, 0.8)),
    "lsun_beds256": dict(_LDM, tdac_lambda=1.0, tdac_radius=0.3, weight_iters=5000,
                         w8a8=(5e-4, 1e-4, 1.0), w4a8=(1e-2, 5e-3, 1.0)),
    "lsun_churches256": dict(_LDM, tdac_lambda=1.0, tdac_radius=0.3, weight_iters=5000,
                             w8a8=(5e-2, 1e-4, 1.0), w4a8=(5e-2, 1e-4, 1.0)),
    "cifar10": dict(_LDM, running_batch=256, tdac_lambda=1.2, tdac_radius=3.0, weight_iters=5000,
                    w8a8=(5e-2, 1e-3, 0.8), w4a8=(5e-1, 5e-4, 0.8)),
    "sd-v1-4": dict(_LDM, tdac_n=256, weight_batch=2, tdac_lambda=5.0, tdac_radius=0.3, weight_iters=1000,
                    w8a8=(5e-4, 1e-4, 0.8), w4a8=(3e-2, 1e-4, 0.8)),
}
# the 2024 release's values where the 2025 scripts changed them (PEERS.md §2.4); the rest is shared [T]
RELEASE_2024 = {"lsun_beds256": {"tdac_lambda": 100.0, "add_loss": 0.001},
                "cin256-v2": {"tdac_lambda": 0.5, "add_loss": 1.3},
                "sd-v1-4": {"tdac_lambda": 50.0, "add_loss": 0.5}}
# The miniatures take their full-size model's recipe with the iterations scaled as Q-Diffusion's digits preset (300
# per unit) and N = 128 trajectories (01: 8 batches of 16 on the sampling schedule); r measured on the digits model's
# middle-attention features: 0.5 ~ the median pairwise mean squared distance (0.56) of its 20 DDIM steps' features
# on the first 16 trajectories, so density tells steps apart (at 3.0 every step is close to nearly every other).
_MINI = {"weight_iters": 300, "micro_batch": 32, "tdac_n": 128}
RECIPES.update({
    "digits": dict(RECIPES["cin256-v2"], **_MINI, tdac_radius=0.5),
    "digits-txt2img": dict(RECIPES["sd-v1-4"], **_MINI, weight_batch=32, tdac_radius=0.5),
    "digits-pixel": dict(RECIPES["cifar10"], **_MINI, running_batch=32, tdac_radius=0.5),
})


@dataclass(frozen=True)
class EDADMConfig(PTQConfig):
    method = "edadm"
    label = "EDA-DM"
    # PTQConfig options EDA-DM has no use for (02 refuses them): no cali_st x cali_n grid (TDAC picks the samples),
    # no f_reg, no first-reach init forward, a fixed squared loss
    unused: ClassVar[tuple] = ("cali_st", "cali_n", "act_init_n", "round_lambda", "round_warmup", "beta_start",
                               "beta_end", "weight_p")
    weight_init: str = "search"
    act_scale_method: str = "search"
    tdac: bool = True                   # False: the same number of samples from every step (the ablation)
    tdac_n: int = 1024                  # N calibration samples, one per trajectory
    tdac_lambda: float = 1.2            # λ: weight of variety against density
    tdac_radius: float = 3.0            # r: density radius on the mean squared feature distance
    weight_iters: int = 1000            # FBR iterations per unit
    weight_lr: float = 5e-1             # lr_w: AdaRound V (cosine to 0)
    act_lr: float = 1e-4                # lr_a: activation Δ (cosine to 0)
    add_loss: float = 0.8               # weight of the layer losses (0: block loss only, the ablation)
    qdrop: float = 0.5                  # QDrop drop probability on activations and unit inputs (0: off)
    running_batch: int = 32             # rows per activation-init batch
    running_momentum: float = 0.9       # the init's EMA: running = 0.9·running + 0.1·batch
    release: str = "2025"               # which release's recipe the preset defaults came from (recorded)

    def checks(self):
        return super().checks() + [
            (isinstance(self.tdac, bool), "tdac must be a boolean (on / off)"),
            (is_int(self.tdac_n) and self.tdac_n >= 1, "tdac_n must be a positive integer"),
            (is_pos(self.tdac_lambda) or self.tdac_lambda == 0, "tdac_lambda must be >= 0"),
            (is_pos(self.tdac_radius), "tdac_radius must be a positive finite number"),
            (is_pos(self.act_lr), "act_lr must be a positive finite number"),
            (is_pos(self.add_loss) or self.add_loss == 0, "add_loss must be >= 0"),
            (isinstance(self.qdrop, (int, float)) and 0 <= self.qdrop < 1, "qdrop must be in [0, 1)"),
            (self.release in RELEASES, f"release must be one of {', '.join(RELEASES)}"),
        ]


def preset_options(preset, w_bits=None, a_bits=None, release="2025"):
    """EDA-DM's defaults for a preset at a precision (plain options for make_config)."""
    base = preset_lookup(RECIPES, preset, "EDA-DM")
    if release not in RELEASES:
        raise UserError(f"EDA-DM has no release {release!r}; known: {', '.join(RELEASES)}.")
    key = "w8a8" if (w_bits or 4) >= 8 else "w4a8"
    lr_w, lr_a, add_loss = base.pop(key)
    base.pop("w4a8" if key == "w8a8" else "w8a8")
    base.update(weight_lr=lr_w, act_lr=lr_a, add_loss=add_loss, release=release)
    if release == "2024":
        base.update(RELEASE_2024.get(preset, {}))
    return base


def policy_rules(config, family):
    """The layer policy without the model-dependent 8-bit activation rule (see ``EDADM.policy_for``)."""
    if family not in FIRST_LAST:
        raise UserError(f"EDA-DM has no layer policy for {family} models.")
    first, last = FIRST_LAST[family]
    return [rule(first, required=True, w_bits=8), rule(last, required=True, w_bits=8, act_quant=False),
            rule(SPLIT_LAYERS[family], split=True), rule("*")]


def second_to_last(unet, rules):
    """The second-to-last layer the rules quantize, in registration order (its input takes 8-bit activations)."""
    from quant.policy import resolve
    names = [n for n, f in resolve(unet, rules).items() if f is not None]
    if len(names) < 2:
        raise UserError("EDA-DM's layer policy needs at least two quantized layers.")
    return names[-2]


@register_method("edadm")
class EDADM(MethodHandler):
    config_class = EDADMConfig
    training = "ptq"

    def layer_spec(self, config, role, n_steps):
        return ptq_layer_spec(config, role)

    def policy_rules(self, config, family):
        return policy_rules(config, family)

    def policy_for(self, config, family, unet):
        rules = policy_rules(config, family)
        name = second_to_last(unet, rules)
        fields = dict(first_rule(rules, name, unet.get_submodule(name))["set"], a_bits=8)
        return [rule(name, **fields)] + rules

    def matmul_quantizers(self, config, kind, n_steps):
        return one_set_matmul_quantizers(config, kind)

    def preset_options(self, preset, w_bits=None, a_bits=None, release="2025", **_):
        return preset_options(preset, w_bits, a_bits, release)

    def init_weights(self, layer, x, config):
        raise UserError("EDA-DM is calibrated by quant.reconstruct.run_ptq, not by the naive calibration stage.")

    # ------------------------------------------------------------------------------------------ pipeline
    def select_rows(self, calib, config, fp_unet, family, device):
        """TDAC (or uniform steps) over calib.pt's trajectories: (rows, log)."""
        from quant.calib_tdac import tdac_select
        return tdac_select(fp_unet, calib, family, config.tdac_n, config.tdac_radius, config.tdac_lambda,
                           config.seed, device, uniform=not config.tdac)

    def objective(self, config):
        from quant.reconstruct.fbr import FBRObjective
        from quant.reconstruct.objectives import ActivationDeltas, AdaRoundWeights
        return FBRObjective([AdaRoundWeights(config.weight_lr, "cosine", rounding=None),
                             ActivationDeltas(config.act_lr, "cosine", max_bits=16)],
                            add_loss=config.add_loss, qdrop_p=config.qdrop)

    def run_ptq(self, session):
        """Weight init, activation init and FBR on a PTQSession (resumable per unit)."""
        from quant.reconstruct.act_init import search_ema_init
        config = session.config
        objective = self.objective(config)
        session.init_weight_quantizers(config.weight_init)
        session.restore()
        with session.timed("act_init_s"):
            if not session.done("act_init"):
                search_ema_init(session.q, session.rows, config.running_batch, config.running_momentum, config.seed,
                                session.device)
                session.commit_act_init()
        with session.timed("fbr_s"):
            session.stage("fbr", lambda unit: objective, config.weight_iters, config.weight_batch)
        return session.finish()
