"""The fused softcapped cross-entropy in bf16 on the GPU against the fp32 eager reference."""
import pytest
import torch

from pgolf.kernels import cross_entropy as ce
from pgolf.kernels.cross_entropy import IGNORE_INDEX, softcap_cross_entropy, softcap_cross_entropy_reference

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "NaN/inf in the output"
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def case(n: int, dim: int, vocab: int, h_scale: float = 2.0):
    h = (torch.randn(n, dim, device="cuda") * h_scale).to(torch.bfloat16)
    w = (torch.randn(vocab, dim, device="cuda") / dim**0.5).to(torch.bfloat16)
    t = torch.randint(0, vocab, (n,), device="cuda")
    t[::11] = IGNORE_INDEX
    return h, w, t


def fwd_bwd(fn, h, w, t, cap, reduction, grad=None):
    ins = [x.detach().requires_grad_() for x in (h, w)]
    loss = fn(*ins, t, cap, reduction)
    grad = torch.ones_like(loss) if grad is None else grad
    return (loss, *torch.autograd.grad(loss, ins, grad))


# record head; token counts and vocab/width off the row blocks (vocab 1000 is no power of two), chunk edges crossed
@pytest.mark.parametrize("n,dim,vocab", [(20_001, 512, 8192), (3001, 200, 1000)])
@pytest.mark.parametrize("cap", [30.0, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bf16_matches_fp32_reference(monkeypatch, n, dim, vocab, cap, reduction):
    monkeypatch.setattr(ce, "CHUNK_ROWS", 8192)
    h, w, t = case(n, dim, vocab)
    grad = torch.rand(n, device="cuda") if reduction == "none" else None
    ours = fwd_bwd(softcap_cross_entropy, h, w, t, cap, reduction, grad)
    ref = fwd_bwd(softcap_cross_entropy_reference, h.float(), w.float(), t, cap, reduction, grad)
    for name, a, b in zip(("loss", "dh", "dW"), ours, ref):
        assert a.shape == b.shape, name
        assert rel(a, b) < 1e-2, name
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16


def test_record_shape_extreme_logits_nan_free():
    h, w, t = case(98_304, 512, 8192, h_scale=200.0)  # logits in the thousands: the cap saturates
    ours = fwd_bwd(softcap_cross_entropy, h, w, t, 30.0, "mean")
    ref = fwd_bwd(softcap_cross_entropy_reference, h.float(), w.float(), t, 30.0, "mean")
    for name, a, b in zip(("loss", "dh", "dW"), ours, ref):
        assert rel(a, b) < 2e-2, name


def test_eval_nll_matches_and_never_holds_all_logits(monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_ROWS", 4096)
    n, dim, vocab = 16_384, 512, 8192
    h, w, t = case(n, dim, vocab)
    with torch.no_grad():
        ref = softcap_cross_entropy_reference(h.float(), w.float(), t, 30.0, "none")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ours = softcap_cross_entropy(h, w, t, 30.0, "none")
        peak = torch.cuda.max_memory_allocated() - base
    assert rel(ours, ref) < 1e-2
    assert (ours[t == IGNORE_INDEX] == 0).all()
    assert peak < n * vocab * 2 / 2  # under half of the bf16 logits, let alone the fp32 ones
    hh, ww = (x.detach().requires_grad_() for x in (h, w))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(softcap_cross_entropy(hh, ww, t), (hh, ww))
    assert torch.cuda.max_memory_allocated() - base < n * vocab * 2


def test_torch_compile_of_a_head_using_it():
    h, w, t = case(5000, 256, 2048)
    h.requires_grad_()
    w.requires_grad_()
    compiled = torch.compile(lambda a, b: softcap_cross_entropy(a, b, t) * 2.0, fullgraph=True)
    loss = compiled(h, w)
    dh, dw = torch.autograd.grad(loss, (h, w))
    ref_in = [x.detach().float().requires_grad_() for x in (h, w)]
    ref = softcap_cross_entropy_reference(*ref_in, t) * 2.0
    ref_dh, ref_dw = torch.autograd.grad(ref, ref_in)
    assert rel(loss, ref) < 1e-2 and rel(dh, ref_dh) < 1e-2 and rel(dw, ref_dw) < 1e-2
