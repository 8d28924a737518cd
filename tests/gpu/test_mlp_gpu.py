"""The fused MLP in bf16 on the GPU against the fp32 eager reference, forward and backward, eager and compiled."""
import pytest
import torch

from pgolf.kernels.mlp import _tma_ready, down_grad_act, fused_mlp, mlp_reference, up_act

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    """These shapes are small: force the kernel (auto mode hands calls under TRITON_MIN_TOKENS to the reference)."""
    monkeypatch.setenv("PGOLF_KERNELS", "triton")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "NaN/inf in the output"
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def case(tokens: int, dim: int, hidden: int, x_scale: float = 1.0):
    x = (torch.randn(tokens, dim, device="cuda") * x_scale).to(torch.bfloat16)
    w_up = (torch.randn(hidden, dim, device="cuda") / dim**0.5).to(torch.bfloat16)
    w_down = (torch.randn(dim, hidden, device="cuda") / hidden**0.5).to(torch.bfloat16)
    grad = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    return x, w_up, w_down, grad


def fwd_bwd(fn, x, w_up, w_down, grad, slope):
    ins = [t.detach().requires_grad_() for t in (x, w_up, w_down)]
    out = fn(*ins, slope)
    return (out, *torch.autograd.grad(out, ins, grad.to(out.dtype)))


# record width; then token counts, widths and hidden sizes off the 64/128/256 blocks (hidden 1004: rows of 2008
# bytes, not 16-byte aligned, so the pointer kernel; the others take the TMA kernel)
@pytest.mark.parametrize("tokens,dim,hidden", [(4099, 512, 2048), (777, 200, 1004), (1000, 384, 1536)])
@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_bf16_matches_fp32_reference(tokens, dim, hidden, slope):
    x, w_up, w_down, grad = case(tokens, dim, hidden)
    ours = fwd_bwd(fused_mlp, x, w_up, w_down, grad, slope)
    ref = fwd_bwd(mlp_reference, x.float(), w_up.float(), w_down.float(), grad, slope)
    eager = fwd_bwd(mlp_reference, x, w_up, w_down, grad, slope)
    for name, a, b, e in zip(("out", "dx", "dw_up", "dw_down"), ours, ref, eager):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        err = rel(a, b)
        assert err < 1e-2, name
        assert err < 2 * rel(e, b) + 1e-3, name  # no worse than eager bf16 arithmetic


@pytest.mark.parametrize("hidden", [2048, 1004])
def test_bf16_act_carries_the_sign(hidden):
    x, w_up, w_down, _ = case(3000, 512, hidden)
    assert _tma_ready(x, w_up, torch.empty(3000, hidden, device="cuda", dtype=torch.bfloat16)) == (hidden == 2048)
    pre = x.float() @ w_up.float().t()
    act = up_act(x, w_up, 0.5)
    plain = up_act(x, w_up, 0.5, encode_sign=False)
    clear = pre.abs() > 1e-3  # signs of near-zero pre may differ between summation orders
    assert torch.equal((act.view(torch.int16) & 1).bool()[clear], (pre > 0)[clear])
    assert rel(plain, torch.where(pre > 0, pre, 0.5 * pre) ** 2) < 5e-3
    assert ((act.float() - plain.float()).abs() <= plain.float().abs() * 2**-7 * 1.001).all()
    dout = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16)
    expected = (dout.float() @ w_down.float()) * torch.where(pre > 0, 2 * pre, 0.5 * pre)
    assert rel(down_grad_act(dout, w_down, act, 0.5), expected) < 1e-2


def test_record_shape_large_inputs_nan_free():
    x, w_up, w_down, grad = case(98_304, 512, 2048, x_scale=8.0)
    ours = fwd_bwd(fused_mlp, x, w_up, w_down, grad, 0.5)
    ref = fwd_bwd(mlp_reference, x.float(), w_up.float(), w_down.float(), grad, 0.5)
    for name, a, b in zip(("out", "dx", "dw_up", "dw_down"), ours, ref):
        assert rel(a, b) < 1e-2, name


def test_torch_compile_of_a_module_using_it():
    class MLP(torch.nn.Module):
        def __init__(self, dim: int, hidden: int):
            super().__init__()
            self.up = torch.nn.Linear(dim, hidden, bias=False)
            self.down = torch.nn.Linear(hidden, dim, bias=False)

        def forward(self, x):
            return fused_mlp(x, self.up.weight, self.down.weight, 0.5) + x

    torch.manual_seed(0)
    module = MLP(256, 1024).cuda().to(torch.bfloat16)
    x = torch.randn(4, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    out_c = compiled(x)
    out_c.float().square().mean().backward()
    grads_c = [x.grad.clone(), module.up.weight.grad.clone(), module.down.weight.grad.clone()]
    x.grad = None
    module.zero_grad()
    out_e = module(x)
    out_e.float().square().mean().backward()
    grads_e = [x.grad, module.up.weight.grad, module.down.weight.grad]
    assert rel(out_c, out_e) < 1e-3
    for a, b in zip(grads_c, grads_e):
        assert rel(a, b) < 1e-2
