"""EDA-DM's own pieces (PEERS.md §2): TDAC (density / variety on a synthetic feature set whose allocation is known,
the rounding rule's tie cases, the one-sample-per-trajectory assignment), the range-search init (against a brute-force
second computation), FBR (which layers give layer losses per block kind, the loss against a hand computation), QDrop
(mixing while reconstructing, untouched outside), the layer policy and presets, and a full run_ptq."""
import pytest
import torch

from ldm.util import UserError
from quant import make_config, quantize_
from quant.activation import ActQuantizer
from quant.calib_tdac import allocate, assign, density, step_weights, tdac_select, variety
from quant.layers import QuantLayer
from quant.methods.edadm import RECIPES, preset_options
from quant.quantizer import fake_quant, search_qparams, search_range
from quant.reconstruct import run_ptq
from quant.reconstruct.fbr import FBRObjective, layer_loss_set, mix, qdrop
from quant.reconstruct.objectives import lp_loss

from ptq_fixtures import TIMESTEPS, fake_calib, small_unet

FAST = dict(tdac_n=4, weight_iters=2, weight_batch=8, running_batch=8, micro_batch=8, tdac_radius=1.0)


# ------------------------------------------------------------------------------------------------------ TDAC
def _features():
    """4 steps of [R=2, C=3, 2, 2] features: steps 0-2 identical along channel e0, step 3 along e1 (orthogonal, far).
    Then D = [2, 2, 2, 0] (r small), V = [1, 1, 1, 3]·R·H·W (1 - cos = 1 against step 3 only)."""
    f = torch.zeros(4, 2, 3, 2, 2)
    f[:3, :, 0] = 1.0
    f[3, :, 1] = 5.0
    return f


def test_density_and_variety_closed_form():
    f = _features()
    assert density(f, 0.5).tolist() == [2, 2, 2, 0]
    assert variety(f).tolist() == pytest.approx([8, 8, 8, 24])   # R·H·W = 8 per orthogonal pair


@pytest.mark.parametrize("lam, n, expected", [
    (2.0, 10, [2, 2, 2, 4]),     # w = [1, 1, 1, 2]: exact
    (1.0, 10, [3, 3, 2, 2]),     # w = [1, 1, 1, 1]: 2.5 -> 2 (half to even), short 2 -> +1 to steps 0, 1
    (0.0, 9, [3, 3, 3, 0]),      # variety ignored: density alone, the lone far step gets nothing
])
def test_counts_follow_the_weights_and_sum_to_n(lam, n, expected):
    w, _, _ = step_weights(_features(), 0.5, lam)
    counts = allocate(w, n)
    assert counts == expected and sum(counts) == n


@pytest.mark.parametrize("weights, n, expected", [
    ([1, 1], 5, [3, 2]),          # 2.5, 2.5 -> 2, 2; short: ties go to the earlier step
    ([1, 1], 7, [4, 3]),          # 3.5, 3.5 -> 4, 4; over: the latest step gives one back
    ([1, 1, 0], 7, [4, 3, 0]),    # over: the latest step with n_k > 0
    ([3, 1], 2, [2, 0]),          # 1.5 -> 2, 0.5 -> 0
    ([1, 1, 1], 2, [1, 1, 0]),    # 0.667 -> 1 each, over by 1 -> the last step
    ([0, 0, 0], 4, [2, 1, 1]),    # no weight: uniform, 1.33 -> 1 each, short -> step 0
    ([5, 1, 1, 1, 1, 1], 13, [7, 2, 1, 1, 1, 1]),   # 6.5 -> 6, 1.3 -> 1; short 2 -> the largest, then step 1
])
def test_rounding_rule(weights, n, expected):
    assert allocate(torch.tensor(weights, dtype=torch.float64), n) == expected


def test_assignment_is_a_seeded_permutation_of_the_counts():
    counts = [3, 0, 2, 5]
    a, b = assign(counts, 7), assign(counts, 7)
    assert torch.equal(a, b) and not torch.equal(a, assign(counts, 8))
    assert torch.bincount(a, minlength=4).tolist() == counts


def test_tdac_select_takes_trajectory_i_at_its_step():
    calib = fake_calib(steps=4, batch=4)
    calib["meta"].update(calib_batch=2, calib_batches=2, n_entries=8, rows_per_entry=4)   # 2 runs x 4 steps x 2
    unet = small_unet()
    rows, log = tdac_select(unet, calib, "compvis_unet", 4, 1.0, 1.2, seed=3, device="cpu")
    assert sum(log["counts"]) == 4 and rows["x"].shape[0] == 8
    steps = assign(log["counts"], 3).tolist()
    for i, k in enumerate(steps):
        run, j = divmod(i, 2)
        start = (run * 4 + k) * 4
        assert torch.equal(rows["x"][2 * i], calib["x"][start + j])          # uncond row of trajectory i
        assert torch.equal(rows["x"][2 * i + 1], calib["x"][start + 2 + j])  # its cond row
        assert rows["step"][2 * i] == k
    with pytest.raises(UserError, match="one sample per trajectory"):
        tdac_select(unet, calib, "compvis_unet", 5, 1.0, 1.2, seed=3, device="cpu")
    uniform, ulog = tdac_select(unet, calib, "compvis_unet", 4, 1.0, 1.2, seed=3, device="cpu", uniform=True)
    assert ulog["counts"] == [1, 1, 1, 1] and "density" not in ulog


# -------------------------------------------------------------------------------------------- range search
def _brute_force(x, bits):
    """Per-tensor symmetric range search spelled out candidate by candidate."""
    lo_x, hi_x = float(x.min()), float(x.max())
    top = max(abs(lo_x), hi_x)
    best = None
    for i in range(1, 101):
        thr = top * i / 100
        lo = 0.0 if lo_x >= 0 else -thr
        delta = max((thr - lo) / (2 ** bits - 1), 1e-8)
        zero = min(max(-round(lo / delta), 0), 2 ** bits - 1)
        xq = (torch.clamp(torch.round(x / delta) + zero, 0, 2 ** bits - 1) - zero) * delta
        score = float((xq - x).abs().pow(2.4).mean())
        if best is None or score < best[0]:
            best = (score, lo, thr)
    return best[1], best[2]


@pytest.mark.parametrize("shift", [0.0, -0.5])
def test_range_search_matches_brute_force(shift):
    x = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    x = x.abs() if shift == 0 else x + shift
    lo, hi = search_range(x, 4)
    ref_lo, ref_hi = _brute_force(x, 4)
    assert float(lo) == pytest.approx(ref_lo, rel=1e-5, abs=1e-7) and float(hi) == pytest.approx(ref_hi, rel=1e-5)
    if shift == 0:
        assert float(lo) == 0.0                      # one-sided: [0, thr]
    else:
        assert float(lo) == pytest.approx(-float(hi))  # two-sided: [-thr, thr]
    delta, zero = search_qparams(lo, hi, 4)
    assert float(delta) == pytest.approx((float(hi) - float(lo)) / 15)


def test_range_search_per_channel_is_per_row():
    w = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 6).view(5, 1, 1, 1)
    lo, hi = search_range(w, 3, per_channel=True)
    for c in range(5):
        ref = search_range(w[c], 3)
        assert float(lo[c]) == pytest.approx(float(ref[0])) and float(hi[c]) == pytest.approx(float(ref[1]))


# ------------------------------------------------------------------------------------------ policy, presets
def test_layer_policy():
    q = quantize_(small_unet(), make_config("edadm", w_bits=4, a_bits=6), TIMESTEPS)
    layers = dict(q.quant_layers())
    names = [n for n, _ in q.quant_layers()]
    assert layers["time_embed.0"].weight_quantizer.bits.unique().tolist() == [8]
    assert layers["out.2"].weight_quantizer.bits.unique().tolist() == [8] and layers["out.2"].act_quantizer is None
    penultimate = layers[names[-2]]
    assert all(a.n_bits == 8 for a in penultimate.act_quantizers())
    assert all(a.n_bits == 6 for n in names[:-2] for a in layers[n].act_quantizers())
    assert all(layers[n].weight_quantizer.bits.unique().tolist() == [4] for n in names if n not in ("time_embed.0",
                                                                                                    "out.2"))
    assert layers["output_blocks.0.0.skip_connection"].split > 0          # shortcut splitting on
    assert all(m.spec.rounding == "adaround" and m.spec.act_scale_method == "search" for m in layers.values())
    attentions = [m for m in q.unet.modules() if type(m).__name__ == "CrossAttention"]
    assert len(q.quant_matmuls()) == 2 * len(attentions) > 0 and q.per_step is False
    assert q.policy["rules"][0] == {"match": names[-2], "set": {"a_bits": 8}}


def test_presets_pick_the_precision_and_release():
    w4 = preset_options("cin256-v2", w_bits=4, a_bits=8)
    w8 = preset_options("cin256-v2", w_bits=8, a_bits=8)
    assert (w4["weight_lr"], w4["act_lr"], w4["add_loss"]) == (5e-1, 1e-4, 0.8)
    assert (w8["weight_lr"], w8["act_lr"], w8["add_loss"]) == (1e-4, 1e-3, 0.8)
    assert (w4["tdac_lambda"], w4["tdac_radius"], w4["weight_iters"], w4["tdac_n"]) == (1.2, 3.0, 1000, 1024)
    old = preset_options("cin256-v2", w_bits=4, a_bits=8, release="2024")
    assert (old["tdac_lambda"], old["add_loss"], old["release"]) == (0.5, 1.3, "2024")
    assert preset_options("lsun_churches256", w_bits=4, a_bits=8, release="2024")["tdac_lambda"] == 1.0
    from ldm.presets import PRESETS as MODEL_PRESETS
    assert set(RECIPES) == set(MODEL_PRESETS)
    for preset in RECIPES:
        make_config("edadm", w_bits=4, a_bits=8, **preset_options(preset, w_bits=4, a_bits=8))


@pytest.mark.parametrize("options, fragment", [
    ({"tdac": "on"}, "tdac must be a boolean"), ({"tdac_n": 0}, "tdac_n"), ({"qdrop": 1.0}, "qdrop"),
    ({"add_loss": -1.0}, "add_loss"), ({"release": "2023"}, "release"), ({"tdac_radius": 0.0}, "tdac_radius"),
])
def test_bad_options_are_user_errors(options, fragment):
    with pytest.raises(UserError, match=fragment):
        make_config("edadm", **options)


# --------------------------------------------------------------------------------------------- FBR, QDrop
def _blocks(model, cls):
    return [m for m in model.modules() if type(m).__name__ == cls]


def test_layer_loss_set_leaves_out_each_blocks_last_layer():
    q = quantize_(small_unet(), make_config("edadm"), TIMESTEPS).unet
    with_skip = [b for b in _blocks(q, "ResBlock") if isinstance(b.skip_connection, QuantLayer)]
    without = [b for b in _blocks(q, "ResBlock") if not isinstance(b.skip_connection, QuantLayer)]
    assert with_skip and without
    for b in with_skip:
        assert layer_loss_set(b) == ["in_layers.2", "emb_layers.1", "out_layers.3"]
    for b in without:
        assert layer_loss_set(b) == ["in_layers.2", "emb_layers.1"]
    for b in _blocks(q, "BasicTransformerBlock"):
        s = layer_loss_set(b)
        assert "attn2.to_out.0" not in s and len(s) == len([m for m in b.modules() if isinstance(m, QuantLayer)]) - 1
        assert s[-1] == "attn2.to_v"
    assert layer_loss_set(q.get_submodule("out.2")) == []


def test_layer_loss_set_of_legacy_attention_and_ddim_blocks():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    legacy = UNetModel(image_size=4, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[1],
                       num_res_blocks=1, channel_mult=[1, 2], num_heads=1)
    q = quantize_(legacy, make_config("edadm"), TIMESTEPS).unet
    for b in _blocks(q, "AttentionBlock"):
        assert layer_loss_set(b) == ["qkv"]                 # proj_out is the last
    from ddim.config import model_config
    from ddim.models.diffusion import Model
    cfg = dict(type="simple", in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
               dropout=0.0, var_type="fixedlarge", ema_rate=0.9999, ema=True, resamp_with_conv=True)
    d = quantize_(Model(model_config(cfg, 8)), make_config("edadm"), TIMESTEPS).unet
    for b in _blocks(d, "ResnetBlock"):
        expected = ["conv1", "temb_proj", "conv2"] + (["nin_shortcut"] if isinstance(getattr(b, "nin_shortcut", None),
                                                                                    QuantLayer) else [])
        assert layer_loss_set(b) == expected[:-1]
    for b in _blocks(d, "AttnBlock"):
        assert layer_loss_set(b) == ["q", "k", "v"]


def test_qdrop_mixes_only_while_active():
    q = ActQuantizer(2)
    x = torch.linspace(-1, 1, 4000)
    q.calibrate(x)
    plain = fake_quant(x, q.delta, q.zero, 4)
    g = torch.Generator().manual_seed(0)
    with qdrop([q], 0.5, lambda: g):
        out = q(x)
    assert bool(((out == x) | (out == plain)).all())
    moved = x != plain                                   # where quantization changes the value
    assert 0.45 < float((out[moved] == x[moved]).float().mean()) < 0.55
    assert torch.equal(q(x), plain)                      # hooks gone: eval / sampling untouched
    with qdrop([q], 0.0, lambda: g):
        assert torch.equal(q(x), plain)


def test_input_mixing():
    a, b = torch.zeros(10000), torch.ones(10000)
    m = mix(((a, b), {"context": a}), ((b, a), {"context": b}), 0.5, torch.Generator().manual_seed(0))
    for mixed in (m[0][0], m[0][1], m[1]["context"]):    # each element from one side, about half from each
        assert bool(((mixed == 0) | (mixed == 1)).all()) and 0.45 < float(mixed.mean()) < 0.55
    assert not torch.equal(m[0][0], 1 - m[0][1])          # fresh noise per tensor
    t = torch.arange(4)
    assert mix(t, t + 1, 0.5, torch.Generator()) is t                 # integer timesteps pass through


def test_fbr_loss_is_block_plus_weighted_layer_losses():
    from types import SimpleNamespace
    from quant.reconstruct.units import Unit
    q = quantize_(small_unet(), make_config("edadm", w_bits=4, a_bits=8), TIMESTEPS).unet
    fp = small_unet()
    name = next(n for n, m in q.named_modules() if type(m).__name__ == "ResBlock" and
                isinstance(m.skip_connection, QuantLayer))
    block, fp_block = q.get_submodule(name), fp.get_submodule(name)
    for m in block.modules():
        if isinstance(m, QuantLayer):
            for a in m.act_quantizers():
                a.calibrate(torch.randn(100))
            for wq, part in m.weight_quantizers():
                wq.delta.data.fill_(0.05)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, block.channels, 4, 4, generator=g), torch.randn(2, block.emb_layers[1].weight.shape[1],
                                                                           generator=g)
    target = fp_block(x, emb)
    obj = FBRObjective([], add_loss=0.7, qdrop_p=0.0)
    unit = Unit(name)
    out = block(x, emb)
    ctx = SimpleNamespace(unit=unit, module=block, fp_module=fp_block, batch={"fp": ((x, emb), {}), "target": target},
                          args=(x, emb), kwargs={}, output=out)
    rec, extra = obj.loss(ctx)
    outs = {}
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(("q", n), o))
             for n in layer_loss_set(block)]
    hooks += [fp_block.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(("fp", n), o))
              for n in layer_loss_set(block)]
    block(x, emb), fp_block(x, emb)
    for h in hooks:
        h.remove()
    by_hand = sum(((outs[("q", n)] - outs[("fp", n)]) ** 2).sum(1).mean() for n in layer_loss_set(block))
    assert float(rec.detach()) == pytest.approx(float(lp_loss(out, target, 2.0).detach()))
    assert float(extra.detach()) == pytest.approx(0.7 * float(by_hand.detach()), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- run
def test_run_ptq_rounds_hard_and_learns_activation_steps(tmp_path):
    calib = fake_calib(steps=4, batch=4)
    config = make_config("edadm", w_bits=4, a_bits=8, **FAST)
    qunet = run_ptq(small_unet(), config, calib, tmp_path, TIMESTEPS, model_id="test")
    log = qunet.ptq_log
    assert sum(log["selection"]["counts"]) == 4 and log["rows"] == 8 and set(log["times"]) == {"act_init_s", "fbr_s"}
    assert all(wq.adaround is None for _, layer in qunet.quant_layers() for wq, _ in layer.weight_quantizers())
    assert all(bool(m.calibrated) for _, m in qunet.quant_layers())
    fresh = quantize_(small_unet(), config, TIMESTEPS)
    moved = [n for (n, a), (_, b) in zip(qunet.named_parameters(), fresh.named_parameters())
             if n.endswith("act_quantizer.delta") and not torch.equal(a, b)]
    assert moved                                          # activation steps were initialised and learned
    # deterministic: the same inputs give the same model
    again = run_ptq(small_unet(), config, calib, tmp_path / "again", TIMESTEPS, model_id="test")
    for (k, v), (_, w) in zip(qunet.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k


def test_tdac_on_the_ddim_model_without_guidance():
    from ddim.config import model_config
    from ddim.models.diffusion import Model
    cfg = dict(type="simple", in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
               dropout=0.0, var_type="fixedlarge", ema_rate=0.9999, ema=True, resamp_with_conv=True)
    model = Model(model_config(cfg, 8)).eval()
    g = torch.Generator().manual_seed(0)
    calib = {"meta": {"n_entries": 3, "rows_per_entry": 4, "calib_steps": 3, "calib_batch": 4, "calib_batches": 1},
             "x": torch.randn(12, 3, 8, 8, generator=g), "t": torch.tensor([900, 500, 100]).repeat_interleave(4)}
    rows, log = tdac_select(model, calib, "ddim_model", 4, 1.0, 1.2, seed=0, device="cpu")
    assert rows["context"] is None and rows["x"].shape[0] == 4 and sum(log["counts"]) == 4
    for i, k in enumerate(assign(log["counts"], 0).tolist()):     # unpaired: one row per sample
        assert torch.equal(rows["x"][i], calib["x"][k * 4 + i]) and int(rows["t"][i]) == [900, 500, 100][k]
