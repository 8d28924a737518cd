"""Hadamard rotation and AWQ scaling are exact inverses and transform the Hessian consistently."""
import pytest
import torch

from pgolf.quant.rotate import (awq_apply, awq_scales, awq_undo, fwht, hadamard_block, hadamard_rotate,
                                hadamard_rotate_hessian, hadamard_unrotate)


@pytest.mark.parametrize("cols", [64, 96, 40])
def test_hadamard_is_orthogonal_and_invertible(cols):
    w = torch.randn(7, cols, dtype=torch.float64)
    x = torch.randn(50, cols, dtype=torch.float64)
    h = x.T @ x
    r = hadamard_rotate(w, seed=3)
    torch.testing.assert_close(hadamard_unrotate(r, seed=3), w)
    torch.testing.assert_close(r.norm(dim=1), w.norm(dim=1))
    # output energy is preserved: tr(W H W^T) = tr(W' H' W'^T)
    hr = hadamard_rotate_hessian(h, seed=3)
    torch.testing.assert_close(torch.trace(r @ hr @ r.T), torch.trace(w @ h @ w.T))
    assert not torch.allclose(r, hadamard_rotate(w, seed=4))


def test_fwht_matches_sylvester_matrix():
    n = 8
    hd = torch.ones(1, 1)
    while hd.shape[0] < n:
        hd = torch.cat([torch.cat([hd, hd], 1), torch.cat([hd, -hd], 1)], 0)
    x = torch.randn(3, n)
    torch.testing.assert_close(fwht(x, n), x @ hd / n ** 0.5)
    assert hadamard_block(96) == 32 and hadamard_block(512) == 512


def test_awq_scaling_round_trip():
    x = torch.randn(200, 24) * torch.linspace(0.1, 5, 24)
    h = x.T @ x / 200
    a = awq_scales(torch.diagonal(h), 0.5)
    assert torch.equal(a, a.half().float()) and abs(float(torch.log(a).mean())) < 1e-2
    w = torch.randn(5, 24)
    w2, h2 = awq_apply(w, h, a)
    torch.testing.assert_close(awq_undo(w2, a), w)
    torch.testing.assert_close(torch.trace(w2 @ h2 @ w2.T), torch.trace(w @ h @ w.T), rtol=1e-4, atol=1e-5)
