"""Triton Newton-Schulz (interpreter, fp32/fp16 operands) against the eager fp64 iteration, small awkward shapes."""
import pytest
import torch

from pgolf.kernels import newton_schulz as ns


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape,schedule,dtype,tol", [
    ((2, 40, 72), "polar_express", torch.float32, 1e-4),
    ((3, 72, 40), "classic", torch.float32, 1e-4),
    ((37, 53), "polar_express", torch.float16, 1e-2),
])
def test_kernel_matches_fp64_iteration(shape, schedule, dtype, tol):
    g = torch.randn(shape) * 3.0
    out = ns.newton_schulz_triton(g, 5, schedule, dtype=dtype)
    assert out.shape == g.shape and out.dtype == dtype
    ref = ns.newton_schulz_reference(g.double(), 5, schedule, dtype=torch.float64)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("fold", [0, 1])
def test_plan_groups_shapes_in_one_launch_and_hits_the_band(fold):
    """Three shapes (one tall) through one plan: each equals its own run; singular values in the band."""
    shapes = [(2, 24, 56), (1, 56, 24), (1, 33, 33)]
    plan = ns.NewtonSchulzPlan(shapes, 5, "polar_express", device="cpu", dtype=torch.float32,
                               blocks={"fold": {"on": fold}})
    gs = [torch.randn(s) for s in shapes]
    for inp, g in zip(plan.inputs, gs):
        inp.copy_(g)
    outs = plan.run()
    for g, out in zip(gs, outs):
        ref = ns.newton_schulz_reference(g.double(), 5, "polar_express", dtype=torch.float64)
        assert out.shape == g.shape
        assert rel_err(out, ref) < 1e-4
    for out in outs[:2]:  # rectangular Gaussian matrices are well conditioned: all singular values in band
        sv = torch.linalg.svdvals(out.double())
        assert sv.min() > 0.84 and sv.max() < 1.16


def test_dispatch_runs_triton_on_cpu_when_forced(monkeypatch):
    monkeypatch.setenv("PGOLF_KERNELS", "triton")
    g = torch.randn(20, 36)
    out = ns.newton_schulz(g, 2, "classic")
    assert out.dtype == torch.bfloat16
    ref = ns.newton_schulz_reference(g.double(), 2, "classic", dtype=torch.float64)
    assert rel_err(out, ref) < 1e-2


def test_counts_and_bad_input():
    record = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]
    dense, sym = ns.flops(record, symmetric=False), ns.flops(record)
    assert dense == pytest.approx(3.7316e11, rel=1e-3) and sym < dense
    with pytest.raises(ValueError, match="schedule"):
        ns.coefficients("cubic", 5)
    with pytest.raises(ValueError, match="expected"):
        ns.newton_schulz(torch.randn(3))


@pytest.mark.parametrize("nesterov,eq_r", [(True, True), (False, False)])
def test_fused_muon_direction_matches_torch(nesterov, eq_r):
    from pgolf.train.optim import muon_direction

    grad, buf = torch.randn(3, 20, 36), torch.randn(3, 20, 36)
    scale = torch.tensor(0.7)
    out = torch.full((3, 36, 20), float("nan")).mT  # a transposed destination, like a tall plan input
    new_buf = buf.clone()
    ns.muon_direction_into(grad, new_buf, out, 0.93, nesterov, eq_r, scale)
    ref_buf = buf.clone()
    ref = muon_direction(grad * scale, ref_buf, 0.93, nesterov, eq_r)
    torch.testing.assert_close(new_buf, ref_buf)
    torch.testing.assert_close(out, ref)


def test_fused_muon_apply_matches_torch():
    p = torch.randn(2, 70, 33)
    u = torch.randn(2, 33, 70).mT
    ref = p * (1 - 0.05 * 0.1) - 0.05 * 1.5 * u
    ns.muon_apply(p, u, 0.05, 0.1, 1.5)
    torch.testing.assert_close(p, ref)
