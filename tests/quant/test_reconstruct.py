"""The streaming reconstruction (quant.reconstruct): bounded cache, forward-order units, one-block reconstruction on
held-out data, resume after a kill, refusal of foreign state, and the packed export of a reconstructed model."""
import os

import pytest
import torch

from ldm.util import UserError
from quant import adaround, load_quantized, make_config, save_quantized
from quant.export import load_export, export_quantized
from quant.reconstruct import run_ptq
from quant.reconstruct import driver as driver_mod
from quant.reconstruct.cache import UnitCache
from quant.reconstruct.driver import CalibrationRows, StageOptions, capture_inputs, collect
from quant.reconstruct.objectives import AdaRoundWeights, Objective
from quant.reconstruct.ptq import PTQSession
from quant.reconstruct.solver import solve

from ptq_fixtures import FAST, SMALL_UNET, TIMESTEPS, fake_calib, small_unet


def _resident(cache):
    return sum(t.numel() * t.element_size() for t in cache.resident_tensors())


def test_cache_stays_within_budget_and_streams_every_shard(tmp_path):
    row = 3 * 8 * 4                       # bytes of one row of "x" (3x8 float32) + its id (int64... below)
    budget = 5 * (row + 8) * 4 + 10       # room for 5 micro-batches of 4 rows, so 40 rows make 8 shards
    cache = UnitCache(budget, tmp_path / "c")
    for i in range(10):
        ids = torch.arange(4 * i, 4 * i + 4)
        cache.add({"x": ids[:, None, None].float().expand(4, 3, 8).clone(), "id": ids})
        assert _resident(cache) <= budget
    assert cache.spilled and cache.rows == 40 and len(os.listdir(tmp_path / "c")) >= 1
    seen_shards, ids_seen = [], set()
    for batch in cache.batches(n_iters=30, batch_size=4, generator=torch.Generator().manual_seed(0)):
        assert _resident(cache) <= budget
        ids = batch["id"]
        assert torch.equal(batch["x"], ids[:, None, None].float().expand(4, 3, 8))   # rows stay intact
        shard = {int(i) // 20 for i in ids}          # shards hold 20 consecutive rows (5 micro-batches)
        assert len(shard) == 1                        # a batch comes from the one resident shard
        seen_shards.append(shard.pop())
        ids_seen |= {int(i) for i in ids}
    assert seen_shards == sorted(seen_shards) or seen_shards[0] == max(seen_shards)
    assert set(seen_shards) == {0, 1} and len(seen_shards) == 30 and len(ids_seen) > 20
    assert cache.peak_bytes <= budget
    cache.close()
    assert not [f for f in os.listdir(tmp_path / "c") if f.startswith("shard-")]


def test_half_precision_cache_halves_memory_and_returns_float32(tmp_path):
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    cache = UnitCache(1 << 20, tmp_path, dtype=torch.float16)
    cache.add({"x": x, "id": torch.arange(6)})
    assert _resident(cache) == 6 * 5 * 2 + 6 * 8
    (batch,) = cache.batches(1, 6, torch.Generator().manual_seed(0))
    assert batch["x"].dtype == torch.float32 and batch["id"].dtype == torch.int64
    assert torch.equal(batch["x"], x[batch["id"]].half().float())


def test_budget_smaller_than_one_micro_batch_is_user_error(tmp_path):
    cache = UnitCache(100, tmp_path)
    with pytest.raises(UserError, match="more than the cache budget"):
        cache.add({"x": torch.zeros(8, 16)})
    with pytest.raises(UserError, match="max_cache_gb"):
        run_ptq(small_unet(), make_config("qdiffusion", **{**FAST, "max_cache_gb": 1e-7}), fake_calib(),
                tmp_path / "run", TIMESTEPS)


def test_units_follow_forward_order(tmp_path):
    session = PTQSession(small_unet(), make_config("qdiffusion", **FAST), _rows(fake_calib()), tmp_path, TIMESTEPS)
    names = [u.name for u in session.units]
    assert names[:4] == ["time_embed.0", "time_embed.2", "input_blocks.0.0", "input_blocks.1.0"]
    assert names[4:7] == ["input_blocks.1.1.proj_in", "input_blocks.1.1.transformer_blocks.0",
                          "input_blocks.1.1.proj_out"]
    assert names[-1] == "out.2" and "middle_block.1.transformer_blocks.0" in names
    # every quantized layer belongs to exactly one unit
    covered = [n for n, _ in session.qunet.quant_layers()
               if any(n == u or n.startswith(u + ".") for u in names)]
    assert len(covered) == len(session.qunet.quant_layers())
    try:
        from types import SimpleNamespace

        from ddim.models.diffusion import Model
    except ImportError:
        return
    cfg = SimpleNamespace(model=SimpleNamespace(type="simple", in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                                                num_res_blocks=1, attn_resolutions=[4], dropout=0.0,
                                                resamp_with_conv=True),
                          data=SimpleNamespace(image_size=8), diffusion=SimpleNamespace(num_diffusion_timesteps=1000))
    from quant import quantize_
    from quant.reconstruct.units import plan_units
    q = quantize_(Model(cfg).eval(), make_config("qdiffusion"), [1])
    order = [u.name for u in plan_units(q.unet, ((torch.zeros(1, 3, 8, 8), torch.ones(1)), {}), family="ddim_model")]
    ups = [n for n in order if n.startswith("up.")]
    assert ups[0].startswith("up.1.block.0") and ups[-1].startswith("up.0.")      # stored reversed, run 1 then 0
    assert [n for n, _ in q.unet.named_modules() if n.startswith("up.")][1].startswith("up.0")
    assert order[0] == "temb.dense.0" and order[-1] == "conv_out"


def _rows(calib, cali_st=4, cali_n=4):
    from quant.calib_select import select_calibration
    return select_calibration(calib, cali_st, cali_n)


def test_block_reconstruction_lowers_heldout_error(tmp_path):
    cfg = make_config("qdiffusion", **{**FAST, "w_bits": 2})
    session = PTQSession(small_unet(), cfg, _rows(fake_calib(seed=0)), tmp_path, TIMESTEPS)
    session.init_weight_quantizers("max")
    unit = next(u for u in session.units if u.name == "input_blocks.1.0")      # a ResBlock
    module, fp_module = unit.module(session.q), unit.module(session.fp)
    objective = Objective([AdaRoundWeights(lr=1e-2, rounding=adaround.RoundingSchedule)], p=2.0)
    heldout = CalibrationRows(**{k: v for k, v in _rows(fake_calib(seed=1)).items() if k != "step"})

    def heldout_error():
        """The weight stage's objective on unseen rows: the quantized block on the partially quantized model's
        inputs against the FP block on the FP model's inputs."""
        call = heldout.call_args(torch.arange(len(heldout)), "cpu")
        with torch.no_grad(), driver_mod.quant_state(session.q, act=False):
            q_args, q_kwargs = capture_inputs(session.q, unit.name, call)
            fp_args, fp_kwargs = capture_inputs(session.fp, unit.name, call)
            return float((module(*q_args, **q_kwargs) - fp_module(*fp_args, **fp_kwargs)).pow(2).sum(1).mean())

    nearest = heldout_error()
    opts = StageOptions(200, 16, 8, 2 ** 30, tmp_path / "cache", 0, "cpu")
    cache = UnitCache(opts.budget_bytes, opts.cache_dir)
    skeleton = collect(unit, session.q, session.fp, objective, session.rows, opts, cache)
    log = solve(unit, module, fp_module, driver_mod._batches(cache, skeleton, opts, torch.Generator().manual_seed(0)),
                objective, opts.iters, "cpu")
    assert log["iterations"] == 200
    after = heldout_error()
    print(f"held-out block error: nearest {nearest:.4f} -> reconstructed {after:.4f}")
    assert after < 0.8 * nearest


class _Killed(Exception):
    pass


def _run(run_dir, kill_after=None, unet_seed=0, **extra):
    calls = [0]
    real = driver_mod.solve

    def solve_then_maybe_die(*args, **kwargs):
        calls[0] += 1
        if kill_after is not None and calls[0] > kill_after:
            raise _Killed
        return real(*args, **kwargs)

    driver_mod.solve = solve_then_maybe_die
    try:
        q = run_ptq(small_unet(unet_seed), make_config("qdiffusion", **{**FAST, **extra}), fake_calib(), run_dir,
                    TIMESTEPS)
    finally:
        driver_mod.solve = real
    return q, calls[0]


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory):
    """One uninterrupted run with a ~200 KiB cache budget (the larger units spill to disk); every add and every
    streamed batch checks the bytes the cache really holds against the budget."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    budget, peaks = int(2e-4 * 2 ** 30), []
    add, batches = UnitCache.add, UnitCache.batches

    def checked_add(self, batch):
        add(self, batch)
        peaks.append(_resident(self))

    def checked_batches(self, *args, **kwargs):
        for b in batches(self, *args, **kwargs):
            peaks.append(_resident(self))
            yield b

    UnitCache.add, UnitCache.batches = checked_add, checked_batches
    try:
        q, calls = _run(run_dir, max_cache_gb=2e-4)
    finally:
        UnitCache.add, UnitCache.batches = add, batches
    return q, calls, run_dir, budget, peaks


def test_cache_budget_holds_on_a_small_model(reconstructed):
    q, _, _, budget, peaks = reconstructed
    assert peaks and max(peaks) <= budget
    logs = {**q.ptq_log["weight"], **q.ptq_log["act"]}
    assert sum(v["spilled"] for v in logs.values()) >= 1 and not all(v["spilled"] for v in logs.values())


def test_resume_after_kill_gives_the_same_model(reconstructed, tmp_path):
    q, calls, *_ = reconstructed
    with pytest.raises(_Killed):
        _run(tmp_path, kill_after=7, max_cache_gb=2e-4)
    resumed, resumed_calls = _run(tmp_path, max_cache_gb=2e-4)
    assert resumed_calls == calls - 7
    a, b = q.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_foreign_state_and_cache_are_refused(reconstructed, tmp_path):
    run_dir = reconstructed[2]
    with pytest.raises(UserError, match="belongs to another model"):
        _run(run_dir, unet_seed=1)
    with pytest.raises(UserError, match="belongs to another model"):
        _run(tmp_path / "other", unet_seed=1, cache_dir=str(run_dir / "recon" / "cache"))


def test_reconstructed_model_saves_loads_and_exports_bitwise(reconstructed, tmp_path):
    q = reconstructed[0]
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 1, 16, generator=g)
    t = torch.tensor([501, 501, 501])
    with torch.no_grad():
        ref = q(x, t, c)
    for name, layer in q.quant_layers():      # hard-rounded integer weights, nothing left of AdaRound
        for wq, part in layer.weight_quantizers():
            codes = layer.weight[:, part] / wq.delta.view(wq._view) + wq.zero.view(wq._view)
            assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert not any("alpha" in k for k in q.state_dict())
    save_quantized(q, tmp_path / "q.pt", {"training": "ptq"})
    loaded, meta = load_quantized(small_unet(), tmp_path / "q.pt")      # no forward before loading
    assert meta["training"] == "ptq" and meta["policy"]["family"] == "compvis_unet"
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c), ref)
        assert torch.equal(loaded(x, torch.tensor([7, 7, 7]), c), q(x, torch.tensor([7, 7, 7]), c))  # any t
    header = export_quantized(q, tmp_path / "q.safetensors", unet_config=SMALL_UNET)
    assert all(v["deviation"]["count"] == 0 for v in header["layers"].values())
    assert any(v["split"] for v in header["layers"].values())
    packed = load_export(tmp_path / "q.safetensors", SMALL_UNET)
    with torch.no_grad():
        assert torch.equal(packed(x, t, c), ref)
