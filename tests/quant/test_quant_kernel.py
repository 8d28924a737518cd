"""The Triton GPTQ sweep against its eager reference (interpreter on CPU, compiled on CUDA)."""
import pytest
import torch

from pgolf.kernels.gptq import gptq_quantize, gptq_quantize_reference, gptq_quantize_triton
from pgolf.quant.gptq import prepare_hessians

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(shapes, cols, dead=(3, 17), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws, hs = [], []
    for rows in shapes:
        mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen)
        x = torch.randn(3 * cols, cols, generator=gen) @ mix
        x[:, list(dead)] = 0.0
        hs.append(x.T @ x / x.shape[0])
        ws.append(0.02 * torch.randn(rows, cols, generator=gen))
    prepared = prepare_hessians(hs)
    w_rows, s_rows, m_rows = [], [], []
    for i, (w, p) in enumerate(zip(ws, prepared)):
        w = w.clone()
        w[:, p.dead] = 0.0
        w_rows.append(w[:, p.perm])
        s_rows.append((11.0 * w.std(dim=1) / 31).half().float())
        m_rows.append(torch.full((w.shape[0],), i, dtype=torch.int32))
    u = torch.stack([p.u for p in prepared])
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(torch.cat(w_rows)), to(u), to(torch.cat(s_rows)), to(torch.cat(m_rows)), prepared


@pytest.mark.parametrize("shapes,cols,block,prefetch", [((37, 20), 100, 32, True), ((5,), 48, 16, False),
                                                         ((19, 33), 70, 64, True)])
def test_triton_sweep_matches_reference(shapes, cols, block, prefetch):
    w, u, s, rm, prepared = _problem(shapes, cols)
    qmax = torch.tensor([31 if m % 2 == 0 else 7 for m in rm.tolist()], dtype=torch.int32, device=DEVICE)
    ref = gptq_quantize_reference(w, u, s, qmax, rm, block_size=block)
    tri = gptq_quantize_triton(w, u, s, qmax, rm, block_size=block, prefetch=prefetch)
    assert tri.dtype == torch.int8 and tri.shape == w.shape
    same = (ref == tri).float().mean().item()
    assert same >= 0.999, f"only {same:.5f} of the codes agree"
    assert (tri.abs() <= qmax[:, None]).all()
    for p in prepared:  # dead columns (zeroed weights) quantize to 0
        assert p.dead.sum() == 2


def test_single_matrix_form_and_dispatch():
    w, u, s, rm, _ = _problem((23,), 40)
    ref = gptq_quantize_reference(w, u[0], s, 31, block_size=16)
    dispatched = gptq_quantize(w, u[0], s, 31, block_size=16)
    if DEVICE == "cpu":  # PGOLF_KERNELS=auto: the reference on CPU tensors
        assert torch.equal(ref, dispatched)
    tri = gptq_quantize_triton(w, u[0], s, 31, block_size=16)
    assert (ref == tri).float().mean() >= 0.999 and (ref == dispatched).float().mean() >= 0.999


def test_bad_inputs_are_named():
    w = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="hinv_u"):
        gptq_quantize_reference(w, torch.eye(7), torch.ones(4), 31)
    with pytest.raises(ValueError, match="row_matrix"):
        gptq_quantize_reference(w, torch.eye(8).expand(2, 8, 8), torch.ones(4), 31)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize_triton(w, torch.eye(8), torch.ones(4), 31, block_size=24)
