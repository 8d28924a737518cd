"""Parallel Muon and the packed all-reduce: gradient communication of `MuonAdam` across ranks, without DDP.

Each shape bank of B matrices is padded to a multiple of the world size N and split into N equal shards;
rank r owns shard r. Per step:
1. the stacked bank gradients are reduce-scattered (async), so each rank receives the summed gradients of
   only its own shard; the gradients of all other groups are packed into one flat buffer per dtype and
   all-reduced (async, one call);
2. each rank runs momentum, MuonEq-R and Newton-Schulz on its shard only (1/N of the work) and launches an
   async all-gather of the bf16 updates bank by bank, so gathering bank i overlaps orthogonalizing bank i+1;
3. AdamW runs while the last gathers are in flight; then every rank applies all updates.
Every rank ends with the same parameters as single-rank Muon on the averaged gradients. The momentum
buffers live only on their owners; `state_dict` gathers them (a collective: call it on every rank).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pgolf.train.optim import OptimConfig, check_buffers, make_banks, make_plan, orthogonalize


class PackedAllReduce:
    """Average the gradients of many small tensors with one all-reduce per dtype."""

    def __init__(self, params: list[nn.Parameter], group: Any):
        self.params = params
        self.group = group
        self.world = dist.get_world_size(group)
        self.pending: list[tuple[torch.Tensor, list[nn.Parameter], Any]] = []

    def launch(self) -> None:
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for params in by_dtype.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            self.pending.append((flat, params, dist.all_reduce(flat, group=self.group, async_op=True)))

    def wait(self) -> None:
        for flat, params, handle in self.pending:
            handle.wait()
            flat.mul_(1.0 / self.world)
            for p, piece in zip(params, flat.split([p.numel() for p in params])):
                if p.grad is None:
                    p.grad = piece.view_as(p).clone()
                else:
                    p.grad.copy_(piece.view_as(p))
        self.pending = []


class ParallelMuon:
    """Muon whose Newton-Schulz work is sharded over the ranks of `group` (see the module docstring)."""

    def __init__(self, params: list[nn.Parameter], cfg: OptimConfig, group: Any):
        self.cfg = cfg
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.banks = make_banks(params)
        self.device = self.banks[0].params[0].device if self.banks else torch.device("cpu")
        self.shard = [-(-b.count // self.world) for b in self.banks]
        self.full_grads = [torch.empty((k * self.world, *b.shape), device=self.device) for b, k in
                           zip(self.banks, self.shard)]
        self.grads = [torch.empty((k, *b.shape), device=self.device) for b, k in zip(self.banks, self.shard)]
        self.bufs = [torch.zeros_like(g) for g in self.grads]
        self.updates = [torch.empty((k * self.world, *b.shape), device=self.device, dtype=torch.bfloat16)
                        for b, k in zip(self.banks, self.shard)]
        self.plans = [make_plan(cfg, [tuple(g.shape)], self.device) for g in self.grads]
        self.scattering: list[Any] = []
        self.gathering: list[Any] = []
        self.step_args: tuple[float, float] = (0.0, 0.0)

    def prepare(self) -> None:
        """Stack each bank's local gradients and launch its reduce-scatter."""
        self.scattering = []
        for bank, full, shard in zip(self.banks, self.full_grads, self.grads):
            bank.gather_grads(full)
            self.scattering.append(dist.reduce_scatter_tensor(shard, full, group=self.group, async_op=True))

    def _wait_scatter(self, i: int) -> None:
        handle = self.scattering[i]
        if handle is not None:
            handle.wait()
            self.grads[i].mul_(1.0 / self.world)
            self.scattering[i] = None

    def grad_sq_norm(self) -> torch.Tensor:
        """Sum of squares of the averaged bank gradients over all ranks (waits for the scatters; one
        scalar all-reduce)."""
        for i in range(len(self.banks)):
            self._wait_scatter(i)
        sq = sum((torch.linalg.vector_norm(g).square() for g in self.grads), torch.zeros((), device=self.device))
        dist.all_reduce(sq, group=self.group)
        return sq

    @torch.no_grad()
    def update(self, lr: float, wd: float, momentum: float, grad_scale: torch.Tensor | None) -> None:
        """Orthogonalize this rank's shards and launch the all-gathers; `finish` applies them."""
        self.step_args = (lr, wd)
        self.gathering = []
        for i, (g, buf) in enumerate(zip(self.grads, self.bufs)):
            self._wait_scatter(i)
            (o,) = orthogonalize(self.plans[i], [g], [buf], momentum, self.cfg, grad_scale)
            if self.updates[i].dtype != o.dtype:  # gather in whatever precision Newton-Schulz returned
                self.updates[i] = torch.empty(self.updates[i].shape, device=self.device, dtype=o.dtype)
            mine = self.updates[i].narrow(0, self.rank * self.shard[i], self.shard[i])
            mine.copy_(o)
            self.gathering.append(dist.all_gather_into_tensor(self.updates[i], mine, group=self.group,
                                                              async_op=True))

    @torch.no_grad()
    def finish(self) -> None:
        lr, wd = self.step_args
        for bank, update, handle in zip(self.banks, self.updates, self.gathering):
            handle.wait()
            bank.apply(update, lr, wd)
        self.gathering = []

    def momentum_buffers(self) -> list[torch.Tensor]:
        """The full momentum of every bank, gathered from the owners (collective)."""
        out = []
        for bank, buf in zip(self.banks, self.bufs):
            full = torch.empty((buf.shape[0] * self.world, *buf.shape[1:]), device=buf.device, dtype=buf.dtype)
            dist.all_gather_into_tensor(full, buf, group=self.group)
            out.append(full[: bank.count])
        return out

    def load_momentum_buffers(self, bufs: list[torch.Tensor]) -> None:
        check_buffers([(b.count, *b.shape) for b in self.banks], bufs)
        for buf, full, k in zip(self.bufs, bufs, self.shard):
            buf.zero_()
            mine = full[self.rank * k: (self.rank + 1) * k]
            buf[: mine.shape[0]].copy_(mine)
