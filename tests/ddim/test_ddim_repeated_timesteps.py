"""Facts about the repeated timesteps of the quad skip (quad-100: 100 values, 96 distinct), pinned.

An identity step (t == t_next) returns x_t up to float rounding for every eta and whatever the network outputs;
calls that share a timestep value in one trajectory therefore see the same x_t (up to rounding). The per-step
noise is still drawn at those steps.
"""
import pytest
import torch

from ddim.config import model_config
from ddim.functions.denoising import ddpm_steps, generalized_steps, step_pairs
from ddim.pipeline import PixelDiffusion

TINY = dict(type="simple", in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16],
            dropout=0.0, var_type="fixedlarge", ema_rate=0.9999, ema=True, resamp_with_conv=True)


class WildEps(torch.nn.Module):
    """Large, input-independent ε from its own generator: identity steps must not care."""

    def __init__(self, seed=0, scale=5.0):
        super().__init__()
        self.gen, self.scale = torch.Generator().manual_seed(seed), scale

    def forward(self, x, t):
        return self.scale * torch.randn(x.shape, generator=self.gen)


@pytest.fixture(scope="module")
def pixel():
    cfg = model_config(TINY, 32)
    cfg.diffusion.beta_schedule, cfg.diffusion.beta_start, cfg.diffusion.beta_end = "linear", 1e-4, 0.02
    torch.manual_seed(0)
    return PixelDiffusion(cfg).eval()


def test_quad100_repeats():
    from ddim.runners.diffusion import timestep_sequence

    seq = timestep_sequence("quad", 100, 1000)
    assert len(seq) == 100 and len(set(seq)) == 96
    assert seq.count(0) == 4 and seq.count(2) == 2 and max(seq) == 800
    identity = [k for k, (t, n) in enumerate(step_pairs(seq)) if t == n]
    assert identity == [93, 96, 97, 98]
    assert [step_pairs(seq)[k] for k in (94, 95, 99)] == [(2, 1), (1, 0), (0, -1)]


@pytest.mark.parametrize("network,eta", [("model", 0.0), ("wild", 0.0), ("wild", 1.0)])
def test_identity_steps_return_x_t(pixel, eta, network):
    saved = pixel.model.diffusion_model
    if network == "wild":
        pixel.model.diffusion_model = WildEps()
    steps = []
    try:
        x_T = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with pixel.record_unet_inputs() as rec:
            pixel.sample(x_T, 100, "quad", eta=eta, generator=torch.Generator().manual_seed(1), callback=steps.append)
    finally:
        pixel.model.diffusion_model = saved
    # the recorder may fold consecutive calls with bit-identical (x, t) into one entry (its CFG-pair rule),
    # which identity steps can produce; the recorded rows are the same either way: one per call
    rows = torch.cat([e["t"] for e in rec.entries])
    assert rows.tolist() == [t for t, _ in step_pairs(pixel.timestep_sequence(100, "quad"))]
    for s in steps:
        change = float((s["x_next"] - s["x"]).abs().max())
        scale = float(s["x"].abs().max())
        if s["t"] == s["t_next"]:
            assert change <= 1e-6 * max(1.0, scale), (s["i"], change)  # float rounding only
        else:
            assert change > 1e-3, (s["i"], change)  # a real step moves x
    # calls sharing a value see the same input: t = 2 at steps 93, 94; t = 0 at steps 96..99
    for group in ((93, 94), (96, 97, 98, 99)):
        first = steps[group[0]]["x"]
        for k in group[1:]:
            assert float((steps[k]["x"] - first).abs().max()) <= 1e-6 * max(1.0, float(first.abs().max()))


def test_identity_steps_still_draw_noise_and_call_the_network(pixel):
    """generalized_steps keeps the original's cost: 100 calls and 100 draws for quad-100, even at eta 0."""
    net = WildEps()
    calls = []
    net.register_forward_pre_hook(lambda m, args: calls.append(float(args[1][0])))
    x = torch.randn(1, 3, 32, 32)
    seq = pixel.timestep_sequence(100, "quad")
    torch.manual_seed(3)
    generalized_steps(x, seq, net, pixel.betas, eta=0.0)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    for _ in seq:
        torch.randn_like(x)
    assert torch.equal(after, torch.get_rng_state())
    assert calls == [float(t) for t, _ in step_pairs(seq)] and calls.count(0.0) == 4


def test_ddpm_identity_steps_are_noise_free(pixel):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    xs, _ = ddpm_steps(x, [0, 0, 5], WildEps(), pixel.betas)  # pairs (5, 0), (0, 0), (0, -1)
    assert float((xs[2] - xs[1]).abs().max()) <= 1e-6 * max(1.0, float(xs[1].abs().max()))
