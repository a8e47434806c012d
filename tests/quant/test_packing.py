"""Property tests for quant.export.packing: exact round trips, byte-exact sizes, and the documented bit layout."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from quant.export.packing import pack_rows, pack_uint, packed_nbytes, unpack_rows, unpack_uint

# Shape classes of the UNet's weights: Linear [Cout, Cin], Conv 1x1 and 3x3 [Cout, Cin, k, k], plus odd sizes.
SHAPE = st.one_of(
    st.tuples(st.integers(1, 24), st.integers(1, 40)),
    st.tuples(st.integers(1, 24), st.integers(1, 20), st.just(1), st.just(1)),
    st.tuples(st.integers(1, 24), st.integers(1, 12), st.just(3), st.just(3)),
    st.tuples(st.integers(1, 9)),
    st.tuples(st.integers(1, 24), st.integers(1, 6).map(lambda k: 8 * k)),          # row length % 8 == 0
    st.tuples(st.integers(1, 24), st.integers(1, 3).map(lambda k: 8 * k), st.just(3), st.just(3)),
)


def reference_pack(codes_rows, row_bits):
    """Slow, obviously-correct packer: one bit at a time, LSB first, rows back to back."""
    out = []
    acc = nbits = 0
    for row, b in zip(codes_rows, row_bits):
        for code in row:
            for k in range(b):
                acc |= ((int(code) >> k) & 1) << nbits
                nbits += 1
                if nbits == 8:
                    out.append(acc)
                    acc = nbits = 0
    if nbits:
        out.append(acc)
    return bytes(out)


def random_codes(shape, row_bits, seed):
    rng = np.random.default_rng(seed)
    high = (1 << np.asarray(row_bits, dtype=np.int64)).reshape((-1,) + (1,) * (len(shape) - 1))
    return torch.from_numpy((rng.integers(0, 1 << 30, size=shape) % high).astype(np.int64))


@settings(max_examples=60, deadline=None)
@given(shape=SHAPE, bits=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_uniform_round_trip_and_size(shape, bits, seed):
    codes = random_codes(shape, [bits] * shape[0], seed)
    packed = pack_uint(codes, bits)
    n = codes.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_uint(packed, bits, shape), codes.to(torch.uint8))


@settings(max_examples=80, deadline=None)
@given(shape=SHAPE, data=st.data(), seed=st.integers(0, 2**31))
def test_mixed_rows_round_trip_size_and_layout(shape, data, seed):
    rows = shape[0]
    row_bits = data.draw(st.lists(st.integers(1, 8), min_size=rows, max_size=rows))
    codes = random_codes(shape, row_bits, seed)
    row_len = codes[0].numel()
    packed = pack_rows(codes, torch.tensor(row_bits))
    # Size: no per-row padding, only the final partial byte.
    assert packed.numel() == math.ceil(sum(row_bits) * row_len / 8) == packed_nbytes(row_bits, row_len)
    # Layout: identical bytes to the one-bit-at-a-time reference.
    flat = codes.reshape(rows, -1).tolist()
    assert bytes(packed.numpy().tobytes()) == reference_pack(flat, row_bits)
    back = unpack_rows(packed, torch.tensor(row_bits), row_len)
    assert torch.equal(back.reshape(shape), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_extremes(bits):
    # All-zeros and all-max codes in a 3x3 conv shape whose row length (5*9=45) is not a multiple of 8.
    top = (1 << bits) - 1
    codes = torch.tensor([0, top]).repeat_interleave(45 * 7 // 2 + 1)[: 7 * 45].reshape(7, 5, 3, 3)
    packed = pack_rows(codes, [bits] * 7)
    assert packed.numel() == math.ceil(7 * 45 * bits / 8)
    assert torch.equal(unpack_rows(packed, [bits] * 7, 45).reshape(codes.shape), codes.to(torch.uint8))


def test_omq_layer_is_theoretical_size():
    # MPQ-DM W2 layer: 10% at 3 bits, 10% at 1 bit, rest 2 bits -> exactly 2 bits per weight on average.
    cout, row_len = 960, 576 * 9
    row_bits = torch.full((cout,), 2)
    row_bits[:96], row_bits[96:192] = 3, 1
    row_bits = row_bits[torch.randperm(cout, generator=torch.Generator().manual_seed(0))]
    codes = random_codes((cout, row_len), row_bits.tolist(), 1)
    packed = pack_rows(codes, row_bits)
    assert packed.numel() == cout * row_len * 2 // 8
    assert torch.equal(unpack_rows(packed, row_bits, row_len), codes.to(torch.uint8))


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[4, 0]]), [2])  # 4 does not fit in 2 bits
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[1, 0]]), [9])
    with pytest.raises(ValueError):
        pack_rows(torch.tensor([[0.5, 0.0]]), [2])
    packed = pack_rows(torch.tensor([[1, 2, 3]]), [2])
    with pytest.raises(ValueError):
        unpack_rows(packed[:-1], [2], 3)  # truncated stream
    with pytest.raises(ValueError):
        unpack_rows(packed, [2, 2], 3)  # layout disagrees with the stream length
