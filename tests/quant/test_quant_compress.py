"""Compressors and the rANS coder round-trip bit-exactly; rANS lands near the entropy; corruption is caught."""
import numpy as np
import pytest

from pgolf.quant import compress as cz


@pytest.mark.parametrize("method", cz.available_methods())
def test_byte_compressors_round_trip(method):
    rng = np.random.default_rng(0)
    for data in (b"", b"x", rng.integers(0, 7, 50_000).astype(np.uint8).tobytes()):
        assert cz.decompress_bytes(cz.compress_bytes(data, method), method) == data


def test_unknown_or_broken_streams_raise():
    with pytest.raises(cz.CompressionError, match="unknown"):
        cz.compress_bytes(b"a", "zip")
    with pytest.raises(cz.CompressionError):
        cz.decompress_bytes(b"\xff" * 64, "lzma")
    with pytest.raises(cz.CompressionError):
        cz.decompress_bytes(cz.compress_bytes(b"weights" * 100, "zlib")[:-9], "zlib")


@pytest.mark.parametrize("n,ctxs", [(0, 1), (1, 1), (5, 2), (4097, 3), (60_001, 5)])
def test_rans_round_trip_with_contexts(n, ctxs):
    rng = np.random.default_rng(n)
    ctx = rng.integers(0, ctxs, n)
    sym = (np.clip(np.round(rng.normal(0, 1 + ctx, n)), -31, 31) + 32).astype(np.uint8)
    data = cz.rans_encode(sym, ctx, ctxs)
    assert np.array_equal(cz.rans_decode(data, ctx), sym)


def test_rans_edge_distributions():
    for sym in (np.full(3000, 200, np.uint8), np.arange(256, dtype=np.uint8).repeat(40),
                np.r_[np.zeros(100_000, np.uint8), np.uint8([255])]):
        assert np.array_equal(cz.rans_decode(cz.rans_encode(sym, lanes=7)), sym)


def test_rans_is_close_to_the_entropy():
    rng = np.random.default_rng(1)
    sym = (np.clip(np.round(rng.normal(0, 2.4, 400_000)), -31, 31) + 32).astype(np.uint8)
    ideal = cz.rans_cost_bits(np.bincount(sym, minlength=256)[None]) / 8
    assert len(cz.rans_encode(sym)) < 1.01 * ideal


def test_normalized_frequencies():
    counts = np.array([[1000000, 1, 1, 0, 5], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    f = cz.normalize_counts(counts)
    assert f[0].sum() == cz.PROB_SCALE and (f[0][[0, 1, 2, 4]] >= 1).all() and f[0][3] == 0
    assert f[1].sum() == 0 and f[2].sum() == cz.PROB_SCALE


def test_rans_detects_corruption_and_truncation():
    rng = np.random.default_rng(2)
    sym = rng.integers(0, 40, 20_000).astype(np.uint8)
    data = bytearray(cz.rans_encode(sym))
    with pytest.raises(cz.CompressionError):
        cz.rans_decode(bytes(data[:-3]))
    data[-100] ^= 0x5A
    with pytest.raises(cz.CompressionError):
        cz.rans_decode(bytes(data))
