"""Q-Diffusion's own pieces: config + presets, calibration selection, symmetric / softmax quantizers, running
statistics, attention-matmul quantizers, and the PTQ entry point's refusals."""
import dataclasses

import pytest
import torch

from ldm.util import UserError
from quant import make_config, quantize_
from quant.activation import ActQuantizer, SoftmaxQuantizer
from quant.calib_select import select_calibration, selected_rows
from quant.layers import LayerSpec, QuantLinear, QuantMatMul
from quant.methods.qdiffusion import PRESETS, preset_options
from quant.quantizer import MSE_P, init_max, init_mse, range_qparams
from quant.reconstruct import run_ptq
from quant.reconstruct.act_init import init_act_quantizers, running_stats
from quant.reconstruct.driver import CalibrationRows

from ptq_fixtures import FAST, TIMESTEPS, fake_calib, small_unet


@pytest.mark.parametrize("options, fragment", [
    ({"lora_rank": 4}, "no LoRA"), ({"weight_iters": -1}, "weight_iters"), ({"softmax_bits": 17}, "softmax_bits"),
    ({"act_lr": 0.0}, "act_lr"), ({"max_cache_gb": float("nan")}, "max_cache_gb"), ({"cali_n": 0}, "cali_n"),
    ({"round_warmup": 1.0}, "round_warmup"), ({"beta_start": 1.0}, "beta must decay"),
    ({"act_scale_method": "kl"}, "act_scale_method"), ({"smoothing": True}, "no smoothing"),
    ({"omq": True}, "no option"),
])
def test_bad_options_are_user_errors(options, fragment):
    with pytest.raises(UserError, match=fragment):
        make_config("qdiffusion", **options)


def test_defaults_and_presets():
    c = make_config("qdiffusion", w_bits=4, a_bits=8)
    assert (c.weight_iters, c.weight_lr, c.weight_batch, c.weight_p) == (20000, 1e-3, 32, 2.0)
    assert (c.act_iters, c.act_lr, c.act_p, c.round_lambda, c.round_warmup) == (5000, 4e-4, 2.4, 0.01, 0.2)
    assert (c.cali_st, c.cali_n, c.softmax_bits, c.running_momentum) == (20, 256, 8, 0.95)
    assert c.quantize_attention_matmuls and c.lora_rank == 0
    from ldm.presets import PRESETS as MODEL_PRESETS
    assert set(PRESETS) == set(MODEL_PRESETS)          # every model preset has Q-Diffusion defaults
    for preset in PRESETS:
        cfg = make_config("qdiffusion", **preset_options(preset))
        assert dataclasses.asdict(cfg)["cali_st"] == PRESETS[preset]["cali_st"]
    sd = make_config("qdiffusion", **preset_options("sd-v1-4"))     # PEERS.md §1.6: SD's own recipe
    assert (sd.cali_st, sd.cali_n, sd.weight_batch, sd.softmax_bits, sd.running_stat) == (25, 128, 8, 16, True)
    cifar = make_config("qdiffusion", **preset_options("cifar10"))
    assert cifar.act_symmetric and cifar.weight_init == "max" and cifar.split
    beds = make_config("qdiffusion", **preset_options("lsun_beds256"))
    assert beds.act_symmetric and beds.running_stat and beds.act_scale_method == "max" and not beds.split
    with pytest.raises(UserError, match="no preset"):
        preset_options("sd")


def test_calibration_selection_closed_form():
    meta = {"n_entries": 20, "rows_per_entry": 6, "calib_steps": 10, "calib_batch": 3, "calib_batches": 2}
    # s = 3: steps 0, 3, 6; samples 0, 1, 2 of run 0 and sample 0 of run 1
    rows, steps = selected_rows(meta, cali_st=3, cali_n=4)
    expected = []
    for k in (0, 3, 6):
        run0, run1 = k * 6, (10 + k) * 6                        # entry (run, step) starts at (run*10 + k)*6
        expected += [run0 + 0, run0 + 1, run0 + 2, run1 + 0]    # uncond rows first
        expected += [run0 + 3, run0 + 4, run0 + 5, run1 + 3]    # then their cond rows
    assert rows.tolist() == expected and steps.tolist() == [0] * 8 + [3] * 8 + [6] * 8
    single = dict(meta, rows_per_entry=3)                       # no guidance: one row per sample
    rows, _ = selected_rows(single, cali_st=2, cali_n=2)
    assert rows.tolist() == [0, 1, 15, 16]                       # s = 5: steps 0 and 5
    calib = fake_calib(steps=4, batch=4)
    sel = select_calibration(calib, cali_st=2, cali_n=3)
    assert torch.equal(sel["x"], calib["x"][[0, 1, 2, 4, 5, 6, 16, 17, 18, 20, 21, 22]])
    assert set(sel["t"][:6].tolist()) == {int(calib["t"][0])} and sel["context"].shape == (12, 1, 16)
    for bad, fragment in (({"cali_st": 11}, "cali_st"), ({"cali_n": 7}, "cali_n")):
        with pytest.raises(UserError, match=fragment):
            selected_rows(meta, **{"cali_st": 2, "cali_n": 2, **bad})
    with pytest.raises(UserError, match="re-record"):
        selected_rows(dict(meta, n_entries=7), 2, 2)
    # a 400-step request on a 1000-step schedule ran 500 steps (stride 2): the recorded timesteps count
    churches = dict(meta, calib_steps=400, n_entries=500, calib_batches=1, calib_timesteps=list(range(1, 1000, 2)))
    rows, steps = selected_rows(churches, cali_st=20, cali_n=1)
    assert steps.unique().tolist() == list(range(0, 500, 25)) and rows[:2].tolist() == [0, 3]


def test_symmetric_and_softmax_quantizers_closed_form():
    x = torch.tensor([-3.0, -0.5, 0.2, 1.0, 2.5])
    d, z = init_max(x, 8, symmetric=True)                      # Δ = max|x| / (2^7 - 1), z offsets the signed grid
    assert d.item() == pytest.approx(3.0 / 127) and z.item() == 128
    q = ActQuantizer(8, symmetric=True, scale_method="max")
    q.calibrate(x)
    y = torch.linspace(-5, 5, 101)
    assert torch.allclose(q(y), torch.clamp(torch.round(y / d), -128, 127) * d)     # [-L'-1, L'], L' = 127
    lo, hi = torch.tensor(-0.4), torch.tensor(2.0)
    assert torch.allclose(range_qparams(lo, hi, 4)[0], torch.tensor(2.4 / 15))
    assert range_qparams(lo, hi, 4)[1].item() == round(0.4 / (2.4 / 15))
    assert range_qparams(lo, hi, 4, symmetric=True)[0].item() == pytest.approx(2.0 / 7)
    # symmetric mse: candidates (max - min)(1 - 0.01 i)/(2^b - 1) on the signed grid, brute force
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(300, generator=g), torch.tensor([6.0])])
    best = min((float(((torch.clamp(torch.round(v / dd), -8, 7) * dd - v).abs() ** MSE_P).mean()), dd)
               for dd in [float(v.max() - v.min()) * (1 - 0.01 * i) / 15 for i in range(80)])
    d_mse, z_mse = init_mse(v, 4, symmetric=True)
    assert d_mse.item() == pytest.approx(best[1], rel=1e-5) and z_mse.item() == 8
    soft = SoftmaxQuantizer(16)
    p = torch.softmax(torch.randn(4, 9, generator=g), -1)
    soft.calibrate(p)
    assert soft.zero.item() == 0 and soft.delta.item() == pytest.approx(p.max().item() / 65535)
    assert torch.allclose(soft(p), p, atol=soft.delta.item() / 2 + 1e-7)
    with pytest.raises(ValueError):
        ActQuantizer(16)


def test_attention_matmul_quantizers_and_one_set():
    q = quantize_(small_unet(), make_config("qdiffusion", softmax_bits=6, a_bits=5, act_symmetric=True), TIMESTEPS)
    mms = dict(q.quant_matmuls())
    assert mms and all(isinstance(m, QuantMatMul) for m in mms.values())
    for name, m in mms.items():
        a, b = m.input_quantizers
        if name.endswith("av_matmul"):
            assert isinstance(a, SoftmaxQuantizer) and a.n_bits == 6 and type(b) is ActQuantizer and b.n_bits == 5
        else:
            assert type(a) is ActQuantizer and type(b) is ActQuantizer and a.symmetric and b.n_bits == 5
    assert all(type(layer.act_quantizer) is ActQuantizer for _, layer in q.quant_layers())
    assert not q.per_step


class _OneLayer(torch.nn.Module):
    """A 'model' called like a UNet (x, t) whose only quantized layer sees x itself."""

    def __init__(self):
        super().__init__()
        spec = LayerSpec(lora_rank=0, act_per_step=False, act_scale_method="max")
        self.lin = QuantLinear(torch.nn.Linear(3, 2), spec)

    def forward(self, x, t):
        return self.lin(x)


def test_activation_init_and_running_statistics_closed_form():
    model = _OneLayer()
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 1.0, 4.0], [-2.0, 3.0, 1.0], [0.5, 0.5, 0.5]])
    rows = CalibrationRows(x, torch.zeros(4, dtype=torch.long))
    seen = init_act_quantizers(model, rows, n_samples=4, seed=0, device="cpu")
    act = model.lin.act_quantizer
    assert act.delta.item() == pytest.approx(6.0 / 255) and act.zero.item() == round(2.0 / (6.0 / 255))
    (lo, hi), = seen.values()
    assert (lo.item(), hi.item()) == (-2.0, 4.0)
    running_stats(model, rows, seen, batch_size=4, momentum=0.95, seed=0, device="cpu")   # one batch: one update
    lo1, hi1 = 0.95 * -2.0 + 0.05 * -2.0, 0.95 * 4.0 + 0.05 * 4.0
    assert act.delta.item() == pytest.approx((hi1 - lo1) / 255)
    running_stats(model, CalibrationRows(x[:1], torch.zeros(1, dtype=torch.long)), seen, 1, 0.95, 0, "cpu")
    lo2, hi2 = 0.95 * -2.0 + 0.05 * -1.0, 0.95 * 4.0 + 0.05 * 2.0
    assert act.delta.item() == pytest.approx((hi2 - lo2) / 255, rel=1e-6)
    assert act.zero.item() == round(-lo2 / ((hi2 - lo2) / 255))


def test_run_ptq_refuses_a_finetuning_method(tmp_path):
    with pytest.raises(UserError, match="not a post-training method"):
        run_ptq(small_unet(), make_config("mpqdm"), fake_calib(), tmp_path, TIMESTEPS)
    with pytest.raises(UserError, match="cali_n"):
        run_ptq(small_unet(), make_config("qdiffusion", **{**FAST, "cali_n": 99}), fake_calib(), tmp_path, TIMESTEPS)
