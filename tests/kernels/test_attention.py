"""Fused varlen attention + XSA (Triton, interpreter on CPU) against the eager fp32 reference, forward and backward."""
import pytest
import torch

from pgolf.kernels import attention as attn
from pgolf.kernels.attention import attention, attention_reference, fused_attention, xsa_reference


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(total, hq, hkv, d, dtype):
    q, k, v = (torch.randn(total, h, d, dtype=dtype, requires_grad=True) for h in (hq, hkv, hkv))
    return q, k, v


def _rel(a, b):
    """Relative error, with an RMS floor of 1e-2 so an all-but-zero reference (XSA of 1-token documents) is fair."""
    assert not torch.isnan(a).any(), "NaN in the kernel output"
    floor = 1e-2 * b.numel() ** 0.5
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(floor)).item()


def _fwd_bwd(fn, q, k, v, cu, xsa, dy):
    y = fn(q, k, v, cu, xsa)
    return (y, *torch.autograd.grad(y, (q, k, v), dy))


def _reference(q, k, v, cu, xsa):
    return attention_reference(q, k, v, cu, int((cu[1:] - cu[:-1]).max()), xsa)


def _check_against_reference(lengths, hq, hkv, d, dtype, xsa, v_scale=None):
    cu = _cu(lengths)
    q, k, v = _inputs(int(cu[-1]), hq, hkv, d, dtype)
    if v_scale is not None:
        with torch.no_grad():
            v.mul_(v_scale.to(dtype)[:, None, None])
    dy = torch.randn_like(q)
    ours = _fwd_bwd(fused_attention, q, k, v, cu, xsa, dy)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = _fwd_bwd(_reference, q32, k32, v32, cu, xsa, dy.float())
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("y", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == dtype and a.shape == b.shape
        assert _rel(a, b) < tol, f"{name}: rel err {_rel(a, b):.2e}"


@pytest.mark.parametrize("lengths", [
    [1, 37, 5, 1, 20],        # awkward, single-token documents, one longer than a 16-row block
    [1] * 9,                  # every token its own document
    [53],                     # one document over several blocks, T not a multiple of the block
    [3, 0, 40, 2],            # an empty document (repeated boundary)
], ids=["awkward", "single_tokens", "one_long", "empty_doc"])
@pytest.mark.parametrize("xsa", [True, False], ids=["xsa", "plain"])
def test_fp32_matches_reference(lengths, xsa):
    _check_against_reference(lengths, 4, 2, 16, torch.float32, xsa)


@pytest.mark.parametrize("hq,hkv,d", [(8, 4, 64), (4, 1, 32), (2, 2, 16)])
def test_fp16_head_layouts(hq, hkv, d):
    _check_against_reference([19, 1, 30], hq, hkv, d, torch.float16, True)


def test_near_zero_values_are_guarded():
    lengths = [7, 1, 26]
    total = sum(lengths)
    scale = torch.ones(total)
    scale[::4] = 1e-9       # ||v|| far below eps: v̂ = v / eps
    scale[1::4] = 3e-5      # just above eps: the projected gradient, scaled by 1 / ||v||
    scale[5] = 0.0          # exactly zero
    _check_against_reference(lengths, 4, 2, 16, torch.float32, True, v_scale=scale)


def test_xsa_output_is_orthogonal_to_own_value():
    cu = _cu([12, 29])
    q, k, v = _inputs(41, 4, 2, 16, torch.float32)
    y = fused_attention(q, k, v, cu, True).detach()
    v_hat = torch.nn.functional.normalize(v.detach(), dim=-1).repeat_interleave(2, dim=1)
    assert (y * v_hat).sum(-1).abs().max().item() < 1e-5
    assert torch.allclose(y, xsa_reference(fused_attention(q, k, v, cu, False).detach(), v.detach()), atol=1e-5)


def test_documents_are_isolated():
    """Changing one document's tokens changes no output or gradient of any other document."""
    lengths = [9, 22, 1, 14]
    cu = _cu(lengths)
    total = sum(lengths)
    q, k, v = _inputs(total, 4, 2, 16, torch.float32)
    dy = torch.randn_like(q)
    base = _fwd_bwd(fused_attention, q, k, v, cu, True, dy)
    lo, hi = int(cu[1]), int(cu[2])
    with torch.no_grad():
        for x in (q, k, v):
            x[lo:hi] = torch.randn_like(x[lo:hi]) * 3
    changed = _fwd_bwd(fused_attention, q, k, v, cu, True, dy)
    others = torch.ones(total, dtype=torch.bool)
    others[lo:hi] = False
    for a, b in zip(base, changed):
        assert torch.equal(a[others], b[others])
    assert not torch.equal(base[0][~others], changed[0][~others])


def test_gqa_group_mapping():
    """Query head h reads KV head h // (Hq / Hkv): perturbing KV head 1 moves only query heads 2 and 3."""
    cu = _cu([17, 24])
    q, k, v = (x.detach() for x in _inputs(41, 4, 2, 16, torch.float32))
    y = fused_attention(q, k, v, cu, True)
    k2, v2 = k.clone(), v.clone()
    k2[:, 1] = torch.randn_like(k2[:, 1])
    v2[:, 1] = torch.randn_like(v2[:, 1])
    y2 = fused_attention(q, k2, v2, cu, True)
    assert torch.equal(y[:, :2], y2[:, :2])
    assert (y[:, 2:] - y2[:, 2:]).abs().min(dim=-1).values.max() > 0


def test_strided_inputs():
    """q, k, v as views of one packed qkv projection (row stride > H * D)."""
    cu = _cu([5, 31])
    qkv = torch.randn(36, 8, 16, requires_grad=True)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    dy = torch.randn(36, 4, 16)
    ours = _fwd_bwd(fused_attention, q, k, v, cu, True, dy)
    ref = _fwd_bwd(_reference, q, k, v, cu, True, dy)
    for a, b in zip(ours, ref):
        assert _rel(a, b) < 2e-5


def test_compile_traces_custom_ops():
    cu = _cu([6, 1, 19])
    q, k, v = _inputs(26, 4, 2, 16, torch.float32)
    dy = torch.randn_like(q)
    compiled = torch.compile(fused_attention, backend="aot_eager", fullgraph=True)
    ours = _fwd_bwd(compiled, q, k, v, cu, True, dy)
    ref = _fwd_bwd(fused_attention, q, k, v, cu, True, dy)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6)


def test_dispatch(monkeypatch):
    cu = _cu([10, 3])
    q, k, v = (x.detach() for x in _inputs(13, 4, 2, 16, torch.float32))
    ref = attention_reference(q, k, v, cu, 10)
    monkeypatch.setenv("PGOLF_KERNELS", "reference")
    assert torch.equal(attention(q, k, v, cu, 10), ref)
    if attn.interpreting():
        monkeypatch.setenv("PGOLF_KERNELS", "triton")
        assert _rel(attention(q, k, v, cu, 10), ref) < 2e-5
    monkeypatch.setenv("PGOLF_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="PGOLF_ATTENTION"):
        attn.backend()


def test_library_path_only_where_it_measured_faster():
    # 48 rows of 2048 tokens, one document each: cuDNN SDPA without XSA, the fused kernel with XSA
    assert attn.library_is_faster(False, 48, 2048, 48 * 2048)
    assert not attn.library_is_faster(True, 48, 2048, 48 * 2048)
    # document-masked (more document slots than rows x seq): no cuDNN path, the fused kernel either way
    assert not attn.library_is_faster(False, 48 * 64, 2048, 48 * 2048)


def test_bad_inputs_are_named():
    q = torch.randn(8, 4, 16)
    k = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_attention(q, k, k, torch.tensor([0, 8]), True)
    with pytest.raises(ValueError, match="multiple"):
        fused_attention(q, torch.randn(8, 3, 16), torch.randn(8, 3, 16), _cu([8]), True)
