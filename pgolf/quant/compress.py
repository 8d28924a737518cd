"""Byte compressors (zstd-22, lzma preset 9|extreme, brotli-11 with a 2^24 window, zlib-9 as the naive baseline
used) and our own rANS coder.

The rANS coder codes small-alphabet symbols (uint8 codes of quantized weights) with static frequency tables,
one per context (a tensor, or a row/column group of a tensor), so it reaches the order-0 entropy of each
context to within a fraction of a percent; LZ-style compressors pay for matching machinery that finds little
in i.i.d.-looking weight codes.

rANS layout: 32-bit states, 16-bit renormalization words, probabilities in 1/2^15. Symbol i goes to lane
i % K (K interleaved lanes, each an independent rANS stream), so that numpy processes all lanes of one step
at once: ~N/K vectorized steps. The encoder walks the steps backwards; the words it emits at step t are
exactly the ones the decoder reads at step t, in lane order. Every lane starts from (and must return to)
the state L = 2^16, which the decoder checks.
"""
from __future__ import annotations

import lzma
import struct
import zlib

import numpy as np

try:
    import zstandard
except ImportError:  # pragma: no cover - not on every machine (the H100 image lacks it)
    zstandard = None
try:
    import brotli
except ImportError:  # pragma: no cover
    brotli = None

PROB_BITS = 15
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 16
_LOOKUP_LIMIT = 1 << 23  # entries of the direct decode table (int32): 32 MB at most
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


class CompressionError(ValueError):
    """A compressed stream that cannot be decoded (corrupt, truncated, or an unknown method)."""


# the byte compressors a QuantConfig may name (zstd and brotli need their packages; see available_methods)
METHODS = ("zstd", "lzma", "brotli", "zlib")


def available_methods() -> list[str]:
    missing = {"zstd": zstandard is None, "brotli": brotli is None}
    return ["none"] + [m for m in METHODS if not missing.get(m, False)]


def _library(method: str):
    """The installed module behind an optional method, or a clear error naming the package."""
    module = {"zstd": zstandard, "brotli": brotli}[method]
    if module is None:
        raise CompressionError(f"{method}: the {'zstandard' if method == 'zstd' else 'brotli'} package is not installed")
    return module


def compress_bytes(data: bytes, method: str) -> bytes:
    if method == "none":
        return bytes(data)
    if method == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if method == "zlib":
        return zlib.compress(data, 9)
    if method == "zstd":
        return _library("zstd").ZstdCompressor(level=22).compress(data)
    if method == "brotli":
        return _library("brotli").compress(data, quality=11, lgwin=24)
    raise CompressionError(f"unknown compression method {method!r}")


def decompress_bytes(data: bytes, method: str) -> bytes:
    try:
        if method == "none":
            return bytes(data)
        if method == "lzma":
            return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        if method == "zlib":
            return zlib.decompress(data)
        if method == "zstd":
            return _library("zstd").ZstdDecompressor().decompress(data)
        if method == "brotli":
            return _library("brotli").decompress(data)
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(f"{method}: cannot decompress ({exc})") from exc
    raise CompressionError(f"unknown compression method {method!r}")


# ----------------------------------------------------------------------------------------------- rANS

def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to 2^15 per row (context), >= 1 wherever the count is > 0."""
    counts = np.asarray(counts, dtype=np.int64)
    freqs = np.zeros_like(counts)
    totals = counts.sum(axis=1)
    for c in np.nonzero(totals)[0]:
        row = counts[c]
        present = row > 0
        f = np.where(present, np.maximum(1, (row * PROB_SCALE) // totals[c]), 0)
        diff = PROB_SCALE - int(f.sum())
        # hand the remainder to (or take it from) the most frequent symbols, never below 1
        order = np.argsort(-row, kind="stable")
        i = 0
        while diff != 0:
            s = order[i % int(present.sum())]
            if diff > 0:
                f[s] += diff
                diff = 0
            elif f[s] > 1:
                take = min(-diff, int(f[s]) - 1)
                f[s] -= take
                diff += take
            i += 1
        freqs[c] = f
    return freqs


def _encode_tables(freqs: np.ndarray) -> bytes:
    """Per context: first symbol, symbol count (u8, u16), then the frequencies (u16 each; 2^15 fits)."""
    parts = []
    for row in freqs:
        nz = np.nonzero(row)[0]
        if nz.size == 0:
            parts.append(struct.pack("<BH", 0, 0))
            continue
        lo, hi = int(nz[0]), int(nz[-1])
        parts.append(struct.pack("<BH", lo, hi - lo + 1))
        parts.append(row[lo:hi + 1].astype("<u2").tobytes())
    return b"".join(parts)


def _decode_tables(data: bytes, n_ctx: int, alphabet: int) -> np.ndarray:
    freqs = np.zeros((n_ctx, alphabet), dtype=np.int64)
    pos = 0
    for c in range(n_ctx):
        lo, n = struct.unpack_from("<BH", data, pos)
        pos += 3
        if lo + n > alphabet:
            raise CompressionError("rANS: frequency table out of range")
        freqs[c, lo:lo + n] = np.frombuffer(data, dtype="<u2", count=n, offset=pos)
        pos += 2 * n
        if n and freqs[c].sum() != PROB_SCALE:
            raise CompressionError("rANS: frequency table does not sum to 2^15")
    return freqs


def rans_cost_bits(counts: np.ndarray) -> float:
    """Ideal code length (bits) of symbols with these per-context counts under their own frequencies."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-(counts * np.where(p > 0, np.log2(p), 0.0)).sum())


def default_lanes(count: int) -> int:
    return int(min(4096, max(1, count // 4096)))


def rans_encode(symbols: np.ndarray, contexts: np.ndarray | None = None, n_contexts: int | None = None,
                lanes: int | None = None) -> bytes:
    """Code uint8 `symbols`, each with the table of its context (int array of the same length, or None)."""
    sym = np.ascontiguousarray(symbols, dtype=np.uint8).reshape(-1)
    n = sym.size
    ctx = np.zeros(n, dtype=np.int64) if contexts is None else np.asarray(contexts, dtype=np.int64).reshape(-1)
    if ctx.size != n:
        raise ValueError(f"rans_encode: {ctx.size} contexts for {n} symbols")
    n_ctx = int(n_contexts if n_contexts is not None else (int(ctx.max()) + 1 if n else 1))
    alphabet = 256
    flat = ctx * alphabet + sym
    counts = np.bincount(flat, minlength=n_ctx * alphabet).reshape(n_ctx, alphabet)
    freqs = normalize_counts(counts)
    cums = np.cumsum(freqs, axis=1) - freqs
    f_flat = freqs.reshape(-1).astype(np.uint64)
    c_flat = cums.reshape(-1).astype(np.uint64)
    k = int(lanes or default_lanes(n))
    steps = -(-n // k)
    x = np.full(k, RANS_L, dtype=np.uint64)
    words = []
    shift_max = np.uint64(32 - PROB_BITS)
    for t in range(steps - 1, -1, -1):
        lo, hi = t * k, min((t + 1) * k, n)
        idx = flat[lo:hi]
        f, c = f_flat[idx], c_flat[idx]
        xs = x[:hi - lo]
        emit = xs >= (f << shift_max)
        words.append((xs[emit] & np.uint64(0xFFFF)).astype("<u2"))
        xs = np.where(emit, xs >> np.uint64(16), xs)
        x[:hi - lo] = (xs // f << np.uint64(PROB_BITS)) + xs % f + c
    stream = np.concatenate(words[::-1]) if words else np.zeros(0, dtype="<u2")
    tables = _encode_tables(freqs)
    header = struct.pack("<QIIII", n, n_ctx, k, len(tables), stream.size)
    return header + tables + x.astype("<u4").tobytes() + stream.tobytes()


def rans_decode(data: bytes, contexts: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `rans_encode`; `contexts` must be the same array the encoder saw."""
    try:
        n, n_ctx, k, tlen, nwords = struct.unpack_from("<QIIII", data, 0)
    except struct.error as exc:
        raise CompressionError("rANS: stream too short for its header") from exc
    pos = struct.calcsize("<QIIII")
    if len(data) != pos + tlen + 4 * k + 2 * nwords:
        raise CompressionError(f"rANS: stream has {len(data)} bytes, header implies {pos + tlen + 4 * k + 2 * nwords}")
    ctx = np.zeros(n, dtype=np.int64) if contexts is None else np.asarray(contexts, dtype=np.int64).reshape(-1)
    if ctx.size != n:
        raise CompressionError(f"rANS: {ctx.size} contexts given for {n} symbols")
    alphabet = 256
    freqs = _decode_tables(data[pos:pos + tlen], n_ctx, alphabet)
    pos += tlen
    x = np.frombuffer(data, dtype="<u4", count=k, offset=pos).astype(np.uint64)
    pos += 4 * k
    stream = np.frombuffer(data, dtype="<u2", count=nwords, offset=pos).astype(np.uint64)
    # flat lookup: entries (context, symbol) with f > 0, sorted by context * 2^15 + cumulative frequency
    cums = np.cumsum(freqs, axis=1) - freqs
    present = np.nonzero(freqs.reshape(-1) > 0)[0]
    starts = (present // alphabet) * PROB_SCALE + cums.reshape(-1)[present]
    f_of = freqs.reshape(-1)[present].astype(np.uint64)
    c_of = cums.reshape(-1)[present].astype(np.uint64)
    s_of = (present % alphabet).astype(np.uint8)
    lookup = None
    if n_ctx * PROB_SCALE <= _LOOKUP_LIMIT:
        # direct table: (context, slot) -> entry, instead of a binary search per symbol
        lookup = (np.searchsorted(starts, np.arange(n_ctx * PROB_SCALE), side="right") - 1).astype(np.int32)
    out = np.empty(n, dtype=np.uint8)
    steps = -(-n // k) if n else 0
    mask = np.uint64(PROB_SCALE - 1)
    pb = np.uint64(PROB_BITS)
    p = 0
    for t in range(steps):
        lo, hi = t * k, min((t + 1) * k, n)
        xs = x[:hi - lo]
        slot = xs & mask
        key = ctx[lo:hi] * PROB_SCALE + slot.astype(np.int64)
        entry = lookup[key] if lookup is not None else np.searchsorted(starts, key, side="right") - 1
        out[lo:hi] = s_of[entry]
        xs = f_of[entry] * (xs >> pb) + slot - c_of[entry]
        need = xs < RANS_L
        m = int(need.sum())
        if p + m > nwords:
            raise CompressionError("rANS: stream ended early (truncated or corrupt)")
        xs[need] = (xs[need] << np.uint64(16)) | stream[p:p + m]
        p += m
        x[:hi - lo] = xs
    if p != nwords or not np.all(x == RANS_L):
        raise CompressionError("rANS: final states do not match (corrupt stream or wrong contexts)")
    return out


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF
