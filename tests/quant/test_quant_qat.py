"""QAT: the forward matches the export's round-to-nearest grid; gradients pass straight through."""
import torch

from pgolf.quant import clip
from pgolf.quant.config import QuantConfig
from pgolf.quant.qat import fake_quantize, qat_active, qat_plan, qat_weight

from ._toy import Toy


def test_forward_matches_export_rounding():
    w = torch.randn(17, 40)
    s = clip.sdclip_scales(w, 6, 12.0)
    expected = clip.rtn(w, s, 31) * s[:, None]
    assert torch.equal(fake_quantize(w, 6, 12.0), expected)
    out = qat_weight(w.bfloat16(), 6, 12.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fake_quantize(w.bfloat16(), 6, 12.0), rtol=1e-2, atol=1e-3)


def test_straight_through_gradients():
    w = torch.randn(8, 30, requires_grad=True)
    qat_weight(w, 4, 3.0).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    w.grad = None
    out = qat_weight(w, 4, 1.5, clipped_grad=True)
    out.sum().backward()
    torch.testing.assert_close(out, fake_quantize(w, 4, 1.5))
    clipped = (w.grad == 0)
    assert clipped.any() and (w.grad[~clipped] == 1).all()


def test_plan_uses_export_classes():
    cfg = QuantConfig(quant_min_numel=1000, qat=True, qat_start_frac=0.5)
    plan = qat_plan(Toy(vocab=97, d=32), cfg)
    assert plan["emb.weight"] == (7, 15.0) and plan["blocks.0.mlp_up.weight"] == (6, 12.0)
    assert "blocks.0.q.weight" in plan and "gain" not in plan
    assert not qat_active(cfg, 0.4) and qat_active(cfg, 0.6)
