"""Process-group setup from torchrun's environment, and the few helpers that rank-0-only work needs.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) each process joins a group: NCCL when it trains on CUDA,
gloo on CPU. Without those variables it is a plain single process and no group is created; every helper
here then acts as the identity, so the trainer has one code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU when CUDA is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r} (auto, cuda or cpu)")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group if there is one; return this process's rank, world and device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        dev = pick_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        # NVLink SHARP multicast is off on the lent machines (device README); users may still turn it on.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, world_size, local_rank, dev, backend)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    return not is_initialized() or dist.get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only (all other ranks stay quiet), flushed so torchrun's log interleaves sensibly."""
    if is_main():
        print(*args, flush=True, **kwargs)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_tensors_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Make every rank hold rank `src`'s values (e.g. the initial weights)."""
    if is_initialized():
        for t in tensors:
            dist.broadcast(t, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
