"""Scale rules and the size model."""
import torch

from pgolf.quant import clip


def test_scale_rules():
    w = torch.randn(6, 200)
    w[0, 3] = 40.0  # an outlier row
    s = clip.sdclip_scales(w, 6, 12.0)
    torch.testing.assert_close(s, (12.0 * w.std(dim=1, correction=0) / 31), rtol=1e-3, atol=0)
    assert torch.equal(s, s.half().float())
    amax = clip.absmax_scales(w, 6)
    assert (clip.rtn(w, amax, 31).abs() <= 31).all() and clip.rtn(w, amax, 31).abs().amax(dim=1).min() >= 30
    p = clip.percentile_scales(w, 6, 50.0)
    assert (p < amax).all()
    searched = clip.search_scales(w, 4)
    err = lambda sc: ((w - clip.rtn(w, sc, 7) * sc[:, None]) ** 2).sum(dim=1)  # noqa: E731
    assert (err(searched) <= err(clip.absmax_scales(w, 4)) + 1e-6).all()
    assert (clip.round_scale(torch.zeros(3)) > 0).all()


def test_size_model_tracks_entropy_and_k():
    w = 0.02 * torch.randn(64, 256)
    m = clip.SizeModel(w)
    s = clip.sdclip_scales(w, 6, 12.0)
    exact = clip.entropy_bits(clip.rtn(w, s, 31), 6) * w.numel() / 8 + 2 * 64
    assert abs(m.nbytes(6, 12.0) - exact) / exact < 0.02
    assert m.nbytes(6, 20.0) < m.nbytes(6, 12.0) < m.nbytes(7, 12.0)
    assert m.error(6, 20.0) > m.error(6, 12.0) > m.error(7, 12.0)


def test_size_model_follows_rules_that_set_their_own_scales():
    """percentile / absmax / search ignore k: the model sizes their own codes (SDClip codes were ~35% smaller)."""
    torch.manual_seed(4)
    w = 0.02 * torch.randn(300, 384)
    h_diag = torch.rand(384) + 0.5
    for mode in ("percentile", "absmax", "search"):
        m = clip.SizeModel(w, h_diag, clip_mode=mode, percentile=99.95)
        for bits in (5, 6, 8):
            s = clip.row_scales(w, bits, mode, percentile=99.95, h_diag=h_diag)
            q = clip.rtn(w, s, clip.qmax_of(bits))
            exact = clip.entropy_bits(q, bits) * w.numel() / 8 + 2 * 300
            assert abs(m.nbytes(bits, 12.0) - exact) / exact < 0.02, (mode, bits)
            assert m.nbytes(bits, 12.0) == m.nbytes(bits, 20.0)  # k plays no part
            err = float((((w - q * s[:, None]) ** 2) * h_diag).sum())
            assert abs(m.error(bits, 12.0) - err) / err < 0.1, (mode, bits)
        assert m.nbytes(5, 12.0) < m.nbytes(6, 12.0) < m.nbytes(8, 12.0)
        assert m.error(5, 12.0) > m.error(6, 12.0) > m.error(8, 12.0)
        assert clip.SizeModel(w, h_diag).nbytes(6, 12.85) < 0.8 * m.nbytes(6, 12.85)
