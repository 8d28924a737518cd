"""2-rank Parallel Muon (gloo on CPU) equals single-rank Muon on the averaged gradients after several steps."""
import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pgolf.train.optim as optim
from pgolf.kernels.newton_schulz import newton_schulz_reference
from pgolf.train.optim import OptimConfig, build_optimizer

WORLD = 2
STEPS = 3


def make_params():
    gen = torch.Generator().manual_seed(3)
    shapes = {"matrix": [(24, 40), (40, 24), (24, 40), (3, 40, 24), (3, 24, 40), (24, 24)],
              "embed": [(50, 24)], "scalar": [(24,), (1,)]}
    return {k: [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in v] for k, v in shapes.items()}


def grads_for(params, step, rank):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return {k: [torch.randn(p.shape, generator=gen) for p in v] for k, v in params.items()}


def worker(rank, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    # fp32 Newton-Schulz on both sides: bf16 would turn last-bit differences of the summation order (the
    # gradient norm summed over shards) into bf16 rounding flips, hiding what this test is about.
    optim.newton_schulz = lambda u, steps, schedule: newton_schulz_reference(u, steps, schedule, dtype=torch.float32)
    try:
        par, ref = make_params(), make_params()
        opt = build_optimizer(par, cfg, process_group=dist.group.WORLD)
        ref_opt = build_optimizer(ref, cfg)
        for step in range(STEPS):
            for o in (opt, ref_opt):
                o.set_step(step)
                o.set_lr_scale(1.0 - 0.1 * step)
            mine = grads_for(par, step, rank)
            every = [grads_for(par, step, r) for r in range(WORLD)]
            for k in par:
                for i, p in enumerate(par[k]):
                    p.grad = mine[k][i].clone()
                    ref[k][i].grad = sum(g[k][i] for g in every) / WORLD
            if step == 1:
                opt.start_grad_sync()
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
        for k in par:
            for p, q in zip(par[k], ref[k]):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5)
        state, ref_state = opt.state_dict(), ref_opt.state_dict()
        for a, b in zip(state["muon"], ref_state["muon"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        opt.load_state_dict(ref_state)
        for a, b in zip(opt.state_dict()["muon"], ref_state["muon"]):
            torch.testing.assert_close(a, b)
        del opt, ref_opt
    finally:
        # Drop every async Work (and the tensors it holds) while the interpreter is alive: gloo's worker
        # threads otherwise abort the process at exit now and then.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_parallel_muon_equals_single_rank(clip):
    cfg = OptimConfig(grad_clip_norm=clip, muon_momentum_warmup_steps=2, matrix_lr=0.05)
    mp.spawn(worker, args=(free_port(), cfg), nprocs=WORLD, join=True)
