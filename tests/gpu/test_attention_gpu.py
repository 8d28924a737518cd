"""Fused and unfused attention paths in bf16 on the GPU against the fp32 eager reference."""
import pytest
import torch

from pgolf.kernels import attention as attn

pytestmark = pytest.mark.gpu


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def _rel(a, b):
    assert not torch.isnan(a).any(), "NaN in the output"
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fwd_bwd(fn, q, k, v, dy):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    y = fn(q, k, v)
    return (y, *torch.autograd.grad(y, (q, k, v), dy))


def _case(lengths, hq=8, hkv=4, d=64, v_scale=None):
    cu = _cu(lengths)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    if v_scale is not None:
        v = v * v_scale.to(v)[:, None, None]
    dy = torch.randn(total, hq, d, device="cuda", dtype=torch.bfloat16)
    return cu, q, k, v, dy


def _against_reference(fn, cu, q, k, v, dy, xsa, tol=1e-2):
    max_len = int((cu[1:] - cu[:-1]).max())
    ours = _fwd_bwd(lambda q, k, v: fn(q, k, v, cu, max_len, xsa), q, k, v, dy)
    ref = _fwd_bwd(lambda q, k, v: attn.attention_reference(q, k, v, cu, max_len, xsa),
                   q.float(), k.float(), v.float(), dy.float())
    for name, a, b in zip(("y", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == torch.bfloat16
        assert _rel(a, b) < tol, f"{name}: rel err {_rel(a, b):.2e}"


def _fused(q, k, v, cu, max_len, xsa):
    return attn.fused_attention(q, k, v, cu, xsa)


LAYOUTS = {
    "dense": [512] * 4,
    "varlen": [1, 700, 3, 1, 129, 1000, 64, 65, 2, 333],
    "tiny_docs": [1] * 50 + [2] * 25 + [7] * 10,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("xsa", [True, False], ids=["xsa", "plain"])
def test_fused_bf16(layout, xsa):
    _against_reference(_fused, *_case(LAYOUTS[layout]), xsa)


def test_fused_near_zero_values():
    lengths = [300, 1, 211]
    scale = torch.ones(sum(lengths), device="cuda")
    scale[::5] = 1e-9
    scale[2::5] = 0.0
    _against_reference(_fused, *_case(lengths, v_scale=scale), True)


def test_default_path_and_compile():
    cu, q, k, v, dy = _case(LAYOUTS["varlen"])
    eager = _fwd_bwd(lambda q, k, v: attn.attention(q, k, v, cu, 1000), q, k, v, dy)
    compiled = torch.compile(lambda q, k, v: attn.attention(q, k, v, cu, 1000), fullgraph=True)
    again = _fwd_bwd(compiled, q, k, v, dy)
    for a, b in zip(eager, again):
        assert _rel(a, b) < 1e-2


def test_dense_without_xsa_takes_cudnn_and_compiles():
    """Equal-length documents without XSA go to cuDNN SDPA (library_is_faster); right, and traceable as one graph."""
    cu, q, k, v, dy = _case(LAYOUTS["dense"])
    _against_reference(attn.attention, cu, q, k, v, dy, False)
    compiled = torch.compile(lambda q, k, v: attn.attention(q, k, v, cu, 512, False), fullgraph=True)
    eager = _fwd_bwd(lambda q, k, v: attn.attention(q, k, v, cu, 512, False), q, k, v, dy)
    for a, b in zip(eager, _fwd_bwd(compiled, q, k, v, dy)):
        assert _rel(a, b) < 1e-2


def test_deterministic_and_isolated():
    """No atomics: two runs agree bit for bit; new tokens in one document leave the others' results alone."""
    cu, q, k, v, dy = _case(LAYOUTS["varlen"])
    first = _fwd_bwd(lambda q, k, v: attn.fused_attention(q, k, v, cu), q, k, v, dy)
    second = _fwd_bwd(lambda q, k, v: attn.fused_attention(q, k, v, cu), q, k, v, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    lo, hi = int(cu[5]), int(cu[6])
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[lo:hi] = torch.randn_like(x[lo:hi])
    changed = _fwd_bwd(lambda q, k, v: attn.fused_attention(q, k, v, cu), q2, k2, v2, dy)
    keep = torch.ones(q.shape[0], dtype=torch.bool, device="cuda")
    keep[lo:hi] = False
    for a, b in zip(first, changed):
        assert torch.equal(a[keep], b[keep])


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_unfused_bf16(layout):
    _against_reference(attn.attention_unfused, *_case(LAYOUTS[layout]), True)
