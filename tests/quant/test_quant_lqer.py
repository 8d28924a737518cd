"""LQER: group quantization round trip and the correction reducing the error it targets."""
import torch

from pgolf.quant.lqer import dequantize_groups, lqer_correction, lqer_factors, quantize_groups


def test_group_quantization_shapes_and_accuracy():
    x = torch.randn(5, 70)
    q, s = quantize_groups(x, 4, 16)
    assert q.shape == (5, 70) and s.shape == (5, 5) and s.dtype == torch.float16
    assert q.abs().max() <= 7
    err = (dequantize_groups(q, s, 16) - x).norm() / x.norm()
    assert err < 0.15


def test_lqer_reduces_the_error():
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.randn(96, 3, generator=gen) @ torch.randn(3, 80, generator=gen)
    err = low_rank + 0.1 * torch.randn(96, 80, generator=gen)
    f = lqer_factors(err, rank=4, group=64, a_bits=2, b_bits=4)
    assert f.a_q.shape == (96, 4) and f.b_q.shape == (4, 80) and f.rank == 4
    assert f.a_q.abs().max() <= 1 and f.b_q.abs().max() <= 7
    left = (err - lqer_correction(f)).norm()
    assert left < 0.6 * err.norm()
    # on pure noise it still does not make things worse
    noise = torch.randn(64, 64, generator=gen)
    assert (noise - lqer_correction(lqer_factors(noise, 4))).norm() < noise.norm()
