"""Bit packing of unsigned integer tensors (1..8 bits) into byte streams.

Layout (one definition used everywhere):
- A stream is a sequence of unsigned codes, each written with its own bit width, concatenated with no gaps.
- Bit order is little-endian: code bit 0 goes first; stream bit k lives in byte k // 8 at bit (k % 8) counting
  from the least significant bit (numpy ``bitorder="little"``).
- Per-row mixed layout (quantized weights): the weight is flattened per output channel to ``[rows, row_len]``;
  row r uses ``row_bits[r]`` bits per code; rows are concatenated in order with NO per-row padding, so row r
  starts at bit ``sum(row_bits[:r]) * row_len``. Offsets follow from ``row_bits`` alone, nothing else is stored.
- The only padding is at the very end: ``ceil(total_bits / 8)`` bytes, i.e. < 1 byte per packed tensor.

Vectorised numpy. Rows of a multiple of 8 codes (every UNet layer except a 3-channel input conv) take a word-wise
path with one pass per distinct bit width; other shapes use bit planes (packbits/unpackbits, no Python loop).
"""
import numpy as np
import torch

MAX_BITS = 8


def packed_nbytes(row_bits, row_len: int) -> int:
    """Bytes of the per-row mixed layout: ceil(sum(row_bits) * row_len / 8)."""
    total = int(np.asarray(_as_numpy(row_bits), dtype=np.int64).sum()) * int(row_len)
    return (total + 7) // 8


def pack_uint(values, bits: int) -> torch.Tensor:
    """Pack codes in [0, 2^bits) (any shape, flattened in C order) into a uint8 tensor of ceil(n*bits/8) bytes."""
    flat = _as_numpy(values).reshape(1, -1)
    return pack_rows(flat, np.full(1, bits, dtype=np.int64))


def unpack_uint(packed, bits: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_uint`; returns a uint8 tensor of ``shape``."""
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    return unpack_rows(packed, np.full(1, bits, dtype=np.int64), n).reshape(shape)


def pack_rows(values, row_bits) -> torch.Tensor:
    """Pack ``values`` (shape [rows, ...], integer codes) with a per-row bit width into one dense bit stream.

    ``row_bits``: length-``rows`` integers in 1..8. Every code of row r must lie in [0, 2^row_bits[r]).
    Returns a 1-D uint8 tensor of :func:`packed_nbytes` bytes.
    """
    vals = _as_numpy(values)
    if vals.dtype.kind not in "ui":
        raise ValueError(f"pack_rows needs integer codes, got dtype {vals.dtype}")
    rows = vals.shape[0] if vals.ndim > 0 else 1
    vals = vals.reshape(rows, -1)
    bits = _check_row_bits(row_bits, rows)
    if vals.size == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if vals.min() < 0 or np.any(vals.max(axis=1).astype(np.int64) >= (np.int64(1) << bits)):
        raise ValueError("codes out of range for their row's bit width")
    if row_len_aligned(vals.shape[1]):
        return torch.from_numpy(_pack_aligned(vals, bits))
    max_b = int(bits.max())
    # Bit planes [rows, row_len, max_b], LSB first. Keeping plane k of row r iff k < bits[r] and reading the
    # kept entries in C order yields exactly the row-after-row concatenation of each row's codes.
    planes = np.unpackbits(vals.astype(np.uint8)[..., None], axis=-1, count=max_b, bitorder="little")
    stream = planes[_plane_mask(bits, planes.shape)]
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack_rows(packed, row_bits, row_len: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: returns uint8 codes of shape [rows, row_len]."""
    data = _as_numpy(packed)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError("packed stream must be a 1-D uint8 tensor")
    bits = _check_row_bits(row_bits, None)
    rows, row_len = bits.shape[0], int(row_len)
    need = packed_nbytes(bits, row_len)
    if data.shape[0] != need:
        raise ValueError(f"packed stream has {data.shape[0]} bytes, layout needs {need}")
    if rows * row_len == 0:
        return torch.zeros((rows, row_len), dtype=torch.uint8)
    if row_len_aligned(row_len):
        return torch.from_numpy(_unpack_aligned(data, bits, row_len))
    total_bits = int(bits.sum()) * row_len
    stream = np.unpackbits(data, count=total_bits, bitorder="little")
    max_b = int(bits.max())
    planes = np.zeros((rows, row_len, max_b), dtype=np.uint8)
    planes[_plane_mask(bits, planes.shape)] = stream
    codes = np.packbits(planes, axis=-1, bitorder="little")[..., 0]
    return torch.from_numpy(np.ascontiguousarray(codes))


def row_len_aligned(row_len: int) -> bool:
    """Rows of a multiple of 8 codes start on byte boundaries whatever their widths: the word-wise fast path."""
    return row_len % 8 == 0


# Fast path (same bytes as the bit-plane path): 8 codes of b bits are exactly b bytes, i.e. one little-endian
# integer of 8·b bits whose bits b·j .. b·j+b-1 hold code j. One pass per distinct width, no per-bit arrays.
def _word_dtype(b):
    return np.uint32 if b <= 4 else np.uint64


def _byte_index(bits, row_len, sel, b):
    starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(bits * (row_len // 8))[:-1]])
    return starts[sel][:, None] + np.arange(row_len // 8 * b, dtype=np.int64)[None, :]


def _pack_aligned(vals, bits):
    rows, row_len = vals.shape
    out = np.empty(int(bits.sum()) * row_len // 8, dtype=np.uint8)
    for b in np.unique(bits):
        b = int(b)
        sel = np.nonzero(bits == b)[0]
        wt = _word_dtype(b)
        codes = vals[sel].astype(wt).reshape(len(sel), row_len // 8, 8)
        word = np.bitwise_or.reduce(codes << (wt(b) * np.arange(8, dtype=wt)), axis=-1)
        chunk = (word[..., None] >> (wt(8) * np.arange(b, dtype=wt))).astype(np.uint8)
        out[_byte_index(bits, row_len, sel, b)] = chunk.reshape(len(sel), -1)
    return out


def _unpack_aligned(data, bits, row_len):
    rows = bits.shape[0]
    out = np.empty((rows, row_len), dtype=np.uint8)
    for b in np.unique(bits):
        b = int(b)
        sel = np.nonzero(bits == b)[0]
        wt = _word_dtype(b)
        chunk = data[_byte_index(bits, row_len, sel, b)].reshape(len(sel), row_len // 8, b).astype(wt)
        word = np.bitwise_or.reduce(chunk << (wt(8) * np.arange(b, dtype=wt)), axis=-1)
        codes = (word[..., None] >> (wt(b) * np.arange(8, dtype=wt))) & wt((1 << b) - 1)
        out[sel] = codes.astype(np.uint8).reshape(len(sel), row_len)
    return out


def _plane_mask(bits: np.ndarray, shape) -> np.ndarray:
    keep = np.arange(shape[2], dtype=np.int64)[None, None, :] < bits[:, None, None]
    return np.broadcast_to(keep, shape)


def _check_row_bits(row_bits, rows):
    bits = np.asarray(_as_numpy(row_bits)).reshape(-1).astype(np.int64)
    if rows is not None and bits.shape[0] != rows:
        raise ValueError(f"row_bits has {bits.shape[0]} entries for {rows} rows")
    if bits.size and (bits.min() < 1 or bits.max() > MAX_BITS):
        raise ValueError(f"bit widths must lie in 1..{MAX_BITS}")
    return bits


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
