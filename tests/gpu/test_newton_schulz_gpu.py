"""Triton Newton-Schulz in bf16 on the GPU: accuracy against the fp64 iteration, CUDA-graph replay, Muon."""
import pytest
import torch

from pgolf.kernels import newton_schulz as ns

pytestmark = pytest.mark.gpu


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("schedule", ["polar_express", "classic"])
@pytest.mark.parametrize("shape", [(3, 200, 328), (5, 333, 130), (300, 300), (2, 512, 2048), (4, 1000, 72)])
def test_bf16_kernel_matches_fp64_iteration(shape, schedule):
    g = torch.randn(shape, device="cuda")
    out = ns.newton_schulz(g, 5, schedule)
    assert out.dtype == torch.bfloat16 and out.shape == g.shape
    ref = ns.newton_schulz_reference(g.double(), 5, schedule, dtype=torch.float64)
    eager = rel_err(ns.newton_schulz_reference(g, 5, schedule), ref)
    err = rel_err(out, ref)
    assert err < max(1.5 * eager, 1e-2), (err, eager)


def test_record_plan_graph_replays_fresh_inputs():
    shapes = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]
    plan = ns.NewtonSchulzPlan(shapes, 5, "polar_express", device="cuda")
    for _ in range(3):  # eager, capture, replay
        gs = [torch.randn(s, device="cuda") for s in shapes]
        for out in plan.outputs:
            out.fill_(float("nan"))
        outs = plan.as_orthogonalizer()(gs)
        for g, out in zip(gs, outs):
            ref = ns.newton_schulz_reference(g[:2].double(), 5, "polar_express", dtype=torch.float64)
            eager = rel_err(ns.newton_schulz_reference(g[:2], 5, "polar_express"), ref)
            assert rel_err(out[:2], ref) < max(1.5 * eager, 1e-2)
            assert torch.isfinite(out).all()
    assert plan.graph is not None
    for out in outs[2:]:  # tall and wide 4:1 matrices: every singular value in the Polar Express band
        sv = torch.linalg.svdvals(out[:3].double())
        assert sv.min() > 0.8 and sv.max() < 1.2


def test_muon_on_cuda_matches_reference_path(monkeypatch):
    """Three optimizer steps with the fused kernels and the captured plan move the weights as close to an
    fp32-Newton-Schulz Muon as the eager bf16 path does."""
    import pgolf.train.optim as optim

    def params():
        torch.manual_seed(5)
        return {"matrix": [torch.nn.Parameter(torch.randn(6, 256, 512, device="cuda") * 0.02),
                           torch.nn.Parameter(torch.randn(3, 1024, 256, device="cuda") * 0.02)],
                "scalar": [torch.nn.Parameter(torch.ones(256, device="cuda"))]}
    fast, eager, truth, start = params(), params(), params(), params()
    cfg = optim.OptimConfig()
    opts = [optim.build_optimizer(fast, cfg)]
    monkeypatch.setenv("PGOLF_KERNELS", "reference")
    opts.append(optim.build_optimizer(eager, cfg))
    opts.append(optim.build_optimizer(truth, cfg))
    def fp32_ns(u, steps, schedule):
        return ns.newton_schulz_reference(u, steps, schedule, dtype=torch.float32)
    for _ in range(3):
        for k in fast:
            for p, q, r in zip(fast[k], eager[k], truth[k]):
                p.grad = torch.randn_like(p)
                q.grad, r.grad = p.grad.clone(), p.grad.clone()
        opts[0].step()
        opts[1].step()
        monkeypatch.setattr(optim, "newton_schulz", fp32_ns)
        opts[2].step()
        monkeypatch.undo()
        monkeypatch.setenv("PGOLF_KERNELS", "reference")
    for p, q, r, p0 in zip(fast["matrix"], eager["matrix"], truth["matrix"], start["matrix"]):
        want = (r.detach() - p0.detach()).double()
        err_fast = rel_err(p.detach() - p0.detach(), want)
        err_eager = rel_err(q.detach() - p0.detach(), want)
        assert err_fast < max(1.5 * err_eager, 1e-2), (err_fast, err_eager)
    torch.testing.assert_close(fast["scalar"][0], truth["scalar"][0])
