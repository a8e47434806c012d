"""Small models and calibration artifacts for the post-training tests (quant.reconstruct, qdiffusion)."""
import torch

from refdata import deterministic_init_

# two levels (so the decoder has skip convs to split), cross-attention at the first: every unit kind appears
SMALL_UNET = dict(image_size=4, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[1],
                  num_res_blocks=1, channel_mult=[1, 2], num_heads=1, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=16)
TIMESTEPS = [1, 251, 501, 751]


def small_unet(seed=0):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    return deterministic_init_(UNetModel(**SMALL_UNET), seed).eval().requires_grad_(False)


def fake_calib(steps=4, batch=4, seed=0, size=4, context_dim=16):
    """A calib.pt-shaped artifact: ``steps`` entries of [uncond; cond] rows (2·batch), sampling order."""
    g = torch.Generator().manual_seed(seed)
    rows = steps * 2 * batch
    t = torch.tensor(TIMESTEPS[::-1][:steps]).repeat_interleave(2 * batch) if steps <= 4 else \
        torch.arange(steps, 0, -1).repeat_interleave(2 * batch) * 10
    return {"meta": {"n_entries": steps, "rows_per_entry": 2 * batch, "calib_steps": steps, "calib_batch": batch,
                     "calib_batches": 1},
            "x": torch.randn(rows, 3, size, size, generator=g), "t": t,
            "context": torch.randn(rows, 1, context_dim, generator=g)}


# fast settings: `max` inits (no 80-candidate searches), a few iterations per unit
FAST = dict(weight_init="max", act_scale_method="max", cali_st=4, cali_n=4, weight_iters=3, act_iters=2,
            weight_batch=8, act_batch=8, act_init_n=8, micro_batch=8)
