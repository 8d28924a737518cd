"""Pack/unpack of every bit width, and range checks."""
import numpy as np
import pytest

from pgolf.quant.bits import pack_bits, packed_nbytes, qmax, qrange, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    lo, hi = qrange(bits)
    for n in (0, 1, 7, 1001):
        v = rng.integers(lo, hi + 1, size=n)
        data = pack_bits(v, bits)
        assert len(data) == packed_nbytes(n, bits)
        assert np.array_equal(unpack_bits(data, bits, n), v)


def test_ranges_and_errors():
    assert qmax(6) == 31 and qmax(2) == 1 and qrange(4) == (-8, 7)
    with pytest.raises(ValueError, match="do not fit"):
        pack_bits(np.array([8]), 4)
    with pytest.raises(ValueError, match="too short"):
        unpack_bits(b"\x00", 6, 5)
    with pytest.raises(ValueError, match="1..8"):
        qmax(9)
