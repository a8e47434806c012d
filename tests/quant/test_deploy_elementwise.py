"""The engine graph's element-wise layout (quant.deploy.elementwise) in plain torch: rows views and the GroupNorm /
SiLU rewrites are the same functions as the 4D originals."""
import pytest
import torch

from quant.deploy.elementwise import GroupNormAsLayerNorm, RowsSiLU, channel_vector, rewrite_for_engine, rows

from refdata import tiny_cin_unet

# (shape, the rows view's shape): a channel's map fills a row from 16 elements up; smaller maps fold the fewest
# channels that fill one (a divisor of C); when none does, all channels share one row
SHAPES = [((2, 8, 8, 8), (2, 8, 64)), ((2, 8, 4, 4), (2, 8, 16)), ((2, 64, 2, 2), (2, 16, 16)),
          ((2, 6, 2, 2), (2, 1, 24)), ((2, 3, 2, 2), (2, 1, 12)), ((2, 10, 3, 3), (2, 5, 18)), ((2, 4, 7), (2, 1, 28))]


@pytest.mark.parametrize("shape,view", SHAPES)
def test_rows_view_and_channel_vectors_match_4d_broadcasting(shape, view):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(shape, generator=g), torch.randn(shape[1], generator=g)
    r = rows(x)
    assert tuple(r.shape) == view
    want = x * v.view((1, -1) + (1,) * (len(shape) - 2)) + v.view((1, -1) + (1,) * (len(shape) - 2))
    got = (r * channel_vector(v, shape) + channel_vector(v, shape)).reshape(shape)
    assert torch.equal(got, want)


@pytest.mark.parametrize("groups,channels,size", [(4, 8, 5), (32, 32, 8), (32, 64, 2), (2, 6, 1)])
def test_group_norm_rewrite_is_the_same_op(groups, channels, size):
    gn = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = torch.randn(3, channels, size, size)
    torch.testing.assert_close(GroupNormAsLayerNorm(gn)(x), gn(x), rtol=1e-5, atol=1e-5)


def test_rows_silu_is_silu_on_maps_and_vectors():
    for x in (torch.randn(3, 6, 2, 2), torch.randn(3, 5), torch.randn(2, 4, 9)):
        assert torch.equal(RowsSiLU()(x), torch.nn.functional.silu(x))


@torch.no_grad()
def test_rewritten_unet_is_the_same_function():
    unet = tiny_cin_unet(seed=0)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 1, 32, generator=g)
    t = torch.tensor([10, 500])
    want = unet(x, t, context=c)
    rewritten = rewrite_for_engine(unet)
    kinds = {type(m) for m in rewritten.modules()}
    assert torch.nn.GroupNorm not in kinds and torch.nn.SiLU not in kinds
    assert GroupNormAsLayerNorm in kinds and RowsSiLU in kinds
    torch.testing.assert_close(rewritten(x, t, context=c), want, rtol=1e-4, atol=1e-4)
