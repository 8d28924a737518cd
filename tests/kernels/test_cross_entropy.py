"""The softcapped cross-entropy row kernel and chunked head (interpreter on CPU) against the eager reference."""
import math

import pytest
import torch

from pgolf.kernels import cross_entropy as ce
from pgolf.kernels.cross_entropy import (IGNORE_INDEX, softcap, softcap_ce_rows_inplace, softcap_cross_entropy,
                                         softcap_cross_entropy_reference)


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("PGOLF_KERNELS", "triton")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "NaN/inf in the kernel's result"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def inputs(n: int, dim: int, vocab: int, dtype: torch.dtype, scale: float = 3.0, ignore_every: int = 7):
    h = (torch.randn(n, dim) * scale).to(dtype).requires_grad_()
    w = torch.randn(vocab, dim).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,))
    t[::ignore_every] = IGNORE_INDEX
    return h, w, t


def check(h, w, t, cap, reduction, tol, ignore_index=IGNORE_INDEX):
    loss = softcap_cross_entropy(h, w, t, cap, reduction, ignore_index)
    grad = torch.randn_like(loss)
    grads = torch.autograd.grad(loss, (h, w), grad)
    ref_in = [x.detach().double().requires_grad_() for x in (h, w)]
    ref = softcap_cross_entropy_reference(*ref_in, t, cap, reduction, ignore_index)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    assert rel(loss, ref) < tol
    assert rel(grads[0], ref_grads[0]) < tol, "dh"
    assert rel(grads[1], ref_grads[1]) < tol, "dW"


# 45 tokens in chunks of 16 (last chunk 13), vocab 70 and width 24 off every block size
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cap", [30.0, 0.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("chunk", [16, 0])
def test_matches_reference_forward_backward(monkeypatch, reduction, cap, dtype, tol, chunk):
    monkeypatch.setattr(ce, "CHUNK_ROWS", chunk)
    check(*inputs(45, 24, 70, dtype), cap, reduction, tol)


def test_wide_cap_uses_the_row_maximum():
    check(*inputs(45, 24, 70, torch.float32, scale=20.0), 50.0, "mean", 1e-5)  # 50: too wide for the fixed shift


def test_long_rows_take_the_two_sweep_path(monkeypatch):
    monkeypatch.setattr(ce, "MAX_ONE_BLOCK", 32)
    monkeypatch.setattr(ce, "LOOP_BLOCK", 32)
    for cap in (30.0, 0.0, 50.0):  # 50: a cap too wide for the fixed exp shift, so the running maximum
        check(*inputs(21, 16, 101, torch.float32), cap, "mean", 1e-5)
        check(*inputs(21, 16, 101, torch.float32), cap, "none", 1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the interpreter's numpy: 2^inf is inf, meant
def test_softcap_identity_at_extreme_logits():
    z = torch.tensor([-math.inf, -3e38, -1e6, -1e3, -60.0, -1e-3, 0.0, 1e-3, 60.0, 1e3, 1e6, 3e38, math.inf])
    for cap in (30.0, 15.0):
        sigmoid_form = 2 * cap * torch.sigmoid(2 * z / cap) - cap
        assert torch.allclose(sigmoid_form, softcap(z, cap), atol=1e-5, rtol=1e-6)
        # the kernel's form, rows whose logits are all extreme: finite loss and gradient, equal to the reference
        logits = torch.stack([z, z.flip(0), torch.full_like(z, -1e30), torch.full_like(z, 1e30)]).repeat(3, 1)
        t = torch.arange(logits.shape[0]) % z.numel()
        ref_in = logits.double().requires_grad_()
        ref_loss = torch.nn.functional.cross_entropy(softcap(ref_in, cap), t, reduction="none")
        ref_loss.sum().backward()
        z_work = logits.clone()
        nll = softcap_ce_rows_inplace(z_work, t, cap, IGNORE_INDEX, scale=torch.ones(1))
        assert torch.isfinite(nll).all() and torch.isfinite(z_work).all()
        assert torch.allclose(nll.double(), ref_loss, rtol=1e-5, atol=1e-5)
        assert torch.allclose(z_work.double(), ref_in.grad, atol=1e-6)


def test_ignore_index_rows_are_zero_and_excluded_from_the_mean():
    h, w, t = inputs(30, 16, 40, torch.float32, ignore_every=3)
    nll = softcap_cross_entropy(h, w, t, reduction="none")
    assert (nll[t == IGNORE_INDEX] == 0).all() and (nll[t != IGNORE_INDEX] > 0).all()
    mean = softcap_cross_entropy(h, w, t, reduction="mean")
    assert torch.allclose(mean, nll.sum() / (t != IGNORE_INDEX).sum())
    dh, = torch.autograd.grad(mean, h)
    assert (dh[t == IGNORE_INDEX] == 0).all()
    # a different ignore value, whose rows must not touch the gradient either
    t2 = t.clone()
    t2[t == IGNORE_INDEX] = 5
    t2[::4] = -1
    check(h, w, t2, 30.0, "mean", 1e-5, ignore_index=-1)


def test_all_ignored_mean_is_nan_like_reference():
    h, w, t = inputs(9, 16, 40, torch.float32)
    t[:] = IGNORE_INDEX
    with torch.no_grad():
        ours = softcap_cross_entropy(h, w, t)
        ref = softcap_cross_entropy_reference(h, w, t)
    assert torch.isnan(ours) and torch.isnan(ref)
    assert softcap_cross_entropy(h, w, t, reduction="sum").item() == 0.0


def test_eval_path_no_grad_matches():
    h, w, t = inputs(40, 24, 70, torch.float16)
    with torch.no_grad():
        for reduction in ("none", "mean", "sum"):
            ours = softcap_cross_entropy(h, w, t, reduction=reduction)
            ref = softcap_cross_entropy_reference(h.double(), w.double(), t, reduction=reduction)
            assert rel(ours, ref) < 5e-3


def test_bad_input_names_the_file():
    h, w, t = inputs(8, 16, 40, torch.float32)
    with pytest.raises(ValueError, match="cross_entropy.py"):
        softcap_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="cross_entropy.py"):
        softcap_cross_entropy(h, w, t[:5])


def test_custom_ops_registration_and_compile_tracing():
    h, w, t = inputs(19, 16, 40, torch.float32)
    for op, args in ((torch.ops.pgolf.softcap_ce_fused.default, (h, w, t, 30.0, IGNORE_INDEX, True, 8)),
                     (torch.ops.pgolf.softcap_ce_rows.default, (h, w, t, 30.0, IGNORE_INDEX, 8))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    compiled = torch.compile(lambda a, b: softcap_cross_entropy(a, b, t), backend="aot_eager", fullgraph=True)
    loss = compiled(h, w)
    dh, dw = torch.autograd.grad(loss, (h, w))
    ref_in = [x.detach().clone().requires_grad_() for x in (h, w)]
    ref = softcap_cross_entropy_reference(*ref_in, t)
    ref_dh, ref_dw = torch.autograd.grad(ref, ref_in)
    assert rel(loss, ref) < 1e-5 and rel(dh, ref_dh) < 1e-5 and rel(dw, ref_dw) < 1e-5
