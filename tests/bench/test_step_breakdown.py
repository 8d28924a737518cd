"""The step benchmark's profile summary (run here on CPU events; the suite reads CUDA kernels)."""
import torch

from pgolf.bench.step import breakdown


def test_breakdown_shares_and_top_kernels():
    a = torch.randn(128, 128)

    def step():
        (a @ a).relu_().sum()

    shares, top = breakdown(step, steps=3, top=4, cuda=False)
    assert abs(sum(shares.values()) - 1.0) < 0.01
    assert set(shares) <= {"attention", "mlp", "cross_entropy", "newton_schulz", "gemm", "elementwise/fused", "other"}
    assert 0 < len(top) <= 4 and all(ms >= 0 and calls > 0 for _, ms, calls in top)
    assert [t[1] for t in top] == sorted((t[1] for t in top), reverse=True)
    assert any("mm" in name for name, _, _ in top)
