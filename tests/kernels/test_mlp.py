"""The fused MLP's Triton kernels (through the interpreter on CPU) against the eager reference, forward and backward."""
import pytest
import torch

from pgolf.kernels import mlp
from pgolf.kernels.mlp import _tma_ready, down_grad_act, fused_mlp, mlp_reference, up_act


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("PGOLF_KERNELS", "triton")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "NaN/inf in the kernel's result"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weights(dim: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w_up = (torch.randn(hidden, dim) / dim**0.5).to(dtype).requires_grad_()
    w_down = (torch.randn(dim, hidden) / hidden**0.5).to(dtype).requires_grad_()
    return w_up, w_down


# token counts, widths and hidden sizes off the 32/16-blocks of the interpreter configs; in fp16, (50, 40, 88) takes
# the TMA kernel (16-byte rows) and the odd hidden sizes 44 and 20 the pointer kernel, as fp32 always does;
# (3, 5) is a batch of sequences
@pytest.mark.parametrize("lead,dim,hidden", [((50,), 40, 88), ((3, 5), 24, 44), ((33,), 16, 20)])
@pytest.mark.parametrize("slope", [0.5, 0.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_matches_reference_forward_backward(lead, dim, hidden, slope, dtype, tol):
    x = torch.randn(*lead, dim).to(dtype).requires_grad_()
    w_up, w_down = weights(dim, hidden, dtype)
    out = fused_mlp(x, w_up, w_down, slope)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w_up, w_down), grad)

    ref_in = [t.detach().double().requires_grad_() for t in (x, w_up, w_down)]
    ref = mlp_reference(*ref_in, slope)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel(out, ref) < tol
    for name, g, r in zip(("dx", "dw_up", "dw_down"), grads, ref_grads):
        assert g.shape == r.shape
        assert rel(g, r) < tol, name


@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 44), (torch.float16, 48), (torch.float16, 44)])
def test_saved_act_carries_the_sign_in_its_last_bit(dtype, hidden):
    x = torch.randn(37, 24).to(dtype)
    w_up = (torch.randn(hidden, 24) / 24**0.5).to(dtype)
    assert _tma_ready(x, w_up, torch.empty(37, hidden, dtype=dtype)) == (dtype == torch.float16 and hidden == 48)
    pre = x.double() @ w_up.double().t()
    exact = torch.where(pre > 0, pre, 0.5 * pre) ** 2
    act = up_act(x, w_up, 0.5)
    bits = act.view(torch.int16 if dtype == torch.float16 else torch.int32)
    assert torch.equal((bits & 1).bool(), pre > 0)
    plain = up_act(x, w_up, 0.5, encode_sign=False)  # the same kernel, act rounded to nearest
    assert rel(plain, exact) < 1e-3
    ulp = torch.finfo(dtype).eps * plain.double().abs().clamp_min(torch.finfo(dtype).tiny)
    step = (act.double() - plain.double()).abs()
    assert (step <= ulp * 1.001).all()  # the encoded act is the rounded one or its neighbour
    assert ((step > 0) == ((bits & 1).bool() != (plain.view(bits.dtype) & 1).bool())).all()
    assert rel(up_act(x, w_up, 0.0), torch.relu(pre) ** 2) < 1e-3


@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 40), (torch.float16, 40), (torch.float16, 36)])
def test_grad_of_act_from_saved_act(dtype, hidden):
    x, dout = torch.randn(29, 24).to(dtype), torch.randn(29, 24).to(dtype)
    w_up, w_down = (w.detach() for w in weights(24, hidden, dtype))
    act = up_act(x, w_up, 0.5)
    pre = x.double() @ w_up.double().t()
    expected = (dout.double() @ w_down.double()) * torch.where(pre > 0, 2 * pre, 0.5 * pre)
    assert rel(down_grad_act(dout, w_down, act, 0.5), expected) < (1e-5 if dtype == torch.float32 else 3e-3)


def test_no_grad_forward_matches():
    x = torch.randn(21, 24)
    w_up, w_down = (w.detach() for w in weights(24, 44, torch.float32))
    with torch.no_grad():
        out = fused_mlp(x, w_up, w_down)
    assert rel(out, mlp_reference(x, w_up, w_down)) < 1e-5


def test_only_weight_grads():
    x = torch.randn(19, 24)
    w_up, w_down = weights(24, 44, torch.float32)
    fused_mlp(x, w_up, w_down).square().sum().backward()
    ref_w = [w.detach().clone().requires_grad_() for w in (w_up, w_down)]
    mlp_reference(x, *ref_w).square().sum().backward()
    assert rel(w_up.grad, ref_w[0].grad) < 1e-5 and rel(w_down.grad, ref_w[1].grad) < 1e-5


def test_failed_tma_descriptor_falls_back_to_the_pointer_kernel(monkeypatch):
    class Refusing:
        @staticmethod
        def from_tensor(*_):
            raise RuntimeError("Triton Error [CUDA]: Failed to create tensor map descriptor: invalid device context")

    monkeypatch.setattr(mlp, "TensorDescriptor", Refusing)
    monkeypatch.setattr(mlp, "say_once", lambda *args: None)
    x = torch.randn(40, 32).half()
    w_up, _ = (w.detach() for w in weights(32, 48, torch.float16))
    assert _tma_ready(x, w_up, torch.empty(40, 48, dtype=torch.float16))
    pre = x.double() @ w_up.double().t()
    assert rel(up_act(x, w_up, 0.5), torch.where(pre > 0, pre, 0.5 * pre) ** 2) < 3e-3


def test_bad_shapes_name_the_file():
    with pytest.raises(ValueError, match="mlp.py"):
        fused_mlp(torch.randn(4, 24), torch.randn(44, 25), torch.randn(24, 44))


def test_custom_op_registration_and_compile_tracing():
    x = torch.randn(37, 24, requires_grad=True)
    w_up, w_down = weights(24, 44, torch.float32)
    result = torch.library.opcheck(torch.ops.pgolf.mlp_forward.default, (x, w_up, w_down, 0.5, True))
    assert all(v == "SUCCESS" for v in result.values()), result
    compiled = torch.compile(lambda a, b, c: mlp.fused_mlp(a, b, c, 0.5), backend="aot_eager", fullgraph=True)
    out = compiled(x, w_up, w_down)
    out.sum().backward()
    ref_in = [t.detach().clone().requires_grad_() for t in (x, w_up, w_down)]
    mlp_reference(*ref_in, 0.5).sum().backward()
    assert rel(out, mlp_reference(*(t.detach() for t in ref_in))) < 1e-5
    assert rel(x.grad, ref_in[0].grad) < 1e-5


def test_auto_mode_picks_the_kernel_only_where_it_measured_faster(monkeypatch):
    calls = []
    monkeypatch.setenv("PGOLF_KERNELS", "auto")
    monkeypatch.setattr(mlp, "use_triton", lambda x: True)

    def triton_stand_in(x, w_up, w_down, slope):
        calls.append(x.shape)
        return mlp.mlp_reference(x, w_up, w_down, slope)

    monkeypatch.setattr(mlp, "_fused_mlp_triton", triton_stand_in)
    w_up, w_down = torch.randn(16, 8), torch.randn(8, 16)
    small = torch.randn(mlp.TRITON_MIN_TOKENS - 1, 8)
    torch.testing.assert_close(mlp.fused_mlp(small, w_up, w_down), mlp.mlp_reference(small, w_up, w_down))
    assert calls == []
    large = torch.randn(2, mlp.TRITON_MIN_TOKENS // 2, 8)
    mlp.fused_mlp(large, w_up, w_down, 0.5)
    mlp.fused_mlp(large, w_up, w_down, 0.0)
    assert calls == [large.shape, large.shape]  # both measured activations, at the record's token count
    mlp.fused_mlp(large, w_up, w_down, 0.25)
    assert len(calls) == 2  # an activation never measured stays on the reference
    monkeypatch.setenv("PGOLF_KERNELS", "triton")
    mlp.fused_mlp(small, w_up, w_down)
    assert len(calls) == 3


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 3e19 squared is inf in fp32, as on the GPU
def test_bf16_sign_encoding_epilogue():
    """The bf16 epilogue (not reachable through a bf16 matmul in the interpreter) on chosen accumulator values:
    the last bit is the sign, the value is one of the two bf16 neighbours of the exact act, inf and NaN survive."""
    import triton
    import triton.language as tl

    @triton.jit
    def epilogue(ACC, OUT_PTR, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.load(ACC + offs, mask=offs < n, other=0.0)
        act = mlp._act_epilogue(acc, 0.5, True, tl.bfloat16, tl.int16)
        tl.store(OUT_PTR + offs, act, mask=offs < n)

    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 1e-30, -1e-30, 3e19, -3e19, 1e-3, -7.5])
    acc = torch.cat([special, torch.randn(200) * 3.0])
    out = torch.empty(acc.numel(), dtype=torch.bfloat16)
    epilogue[(1,)](acc, out, acc.numel(), BLOCK=256)
    bits = out.view(torch.int16)
    finite = torch.isfinite(out)
    assert finite.all(), "an encoded act overflowed or became NaN"
    assert torch.equal((bits & 1).bool(), acc > 0)
    exact = torch.where(acc > 0, acc, 0.5 * acc).double() ** 2
    low = exact.float().view(torch.int32) >> 16  # truncated bf16 neighbour
    got = bits.to(torch.int32) & 0xFFFF
    assert (((got == low) | (got == low + 1)) | (exact > 3.38e38)).all()
    nan = torch.full((4,), float("nan"))
    epilogue[(1,)](nan, out, 4, BLOCK=256)
    assert torch.isnan(out[:4].float()).all()
