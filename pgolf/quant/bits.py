"""Signed b-bit integers (b in 1..8) <-> bytes: one byte per value, or a dense bit stream.

A value q in [-2^(b-1), 2^(b-1)-1] is stored as the unsigned code q + 2^(b-1); the stream is big-endian within
each byte (numpy packbits order), so `count * b` bits padded up to whole bytes.
"""
from __future__ import annotations

import numpy as np

_CHUNK = 1 << 22  # values per chunk: bounds the (chunk, b) bit matrix to 32 MB


def qrange(bits: int) -> tuple[int, int]:
    """Inclusive range of the signed code; quantizers use the symmetric part [-(2^(b-1)-1), 2^(b-1)-1]."""
    _check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def qmax(bits: int) -> int:
    """Largest magnitude of the symmetric quantizer of `bits` bits (int6 -> 31, int2 -> 1)."""
    _check_bits(bits)
    return (1 << (bits - 1)) - 1


def _check_bits(bits: int) -> None:
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bit width must be in 1..8, not {bits}")


def to_codes(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed values -> unsigned codes (uint8), refusing values outside the b-bit range."""
    lo, hi = qrange(bits)
    v = np.asarray(values)
    if v.size and (int(v.min()) < lo or int(v.max()) > hi):
        raise ValueError(f"values in [{int(v.min())}, {int(v.max())}] do not fit {bits} bits ([{lo}, {hi}])")
    return (v.astype(np.int16) - lo).astype(np.uint8).reshape(-1)


def from_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    lo, _ = qrange(bits)
    return (codes.astype(np.int16) + lo).astype(np.int8)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Dense bit stream of signed b-bit values (vectorized, chunked)."""
    codes = to_codes(values, bits)
    if bits == 8:
        return codes.tobytes()
    out = []
    # chunks hold a multiple of 8 values so that each chunk ends on a byte boundary
    for start in range(0, codes.size, _CHUNK):
        part = codes[start:start + _CHUNK]
        matrix = np.unpackbits(part[:, None], axis=1)[:, 8 - bits:]
        out.append(np.packbits(matrix.reshape(-1)).tobytes())
    return b"".join(out)


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` signed values as int8."""
    _check_bits(bits)
    need = (count * bits + 7) // 8
    if len(data) < need:
        raise ValueError(f"bit stream too short: {len(data)} bytes for {count} values of {bits} bits ({need} needed)")
    raw = np.frombuffer(data, dtype=np.uint8, count=need)
    if bits == 8:
        return from_codes(raw, bits)
    out = np.empty(count, dtype=np.uint8)
    chunk_bytes = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        stream = np.unpackbits(raw[i * chunk_bytes:i * chunk_bytes + (n * bits + 7) // 8])[:n * bits]
        padded = np.zeros((n, 8), dtype=np.uint8)
        padded[:, 8 - bits:] = stream.reshape(n, bits)
        out[start:start + n] = np.packbits(padded, axis=1)[:, 0]
    return from_codes(out, bits)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8
