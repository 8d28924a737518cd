"""The evaluation's wall-clock budget: time per phase, and a gate for optional work.

The contest allows 600 s of evaluation. Scoring every token is mandatory; test-time training steps and global
phases are optional. Evaluators ask `allow(name, estimate, reserve)` before each optional piece of work: it
fits when elapsed + estimate + reserve (time the mandatory rest still needs) + margin stays under the limit.
Once an optional kind of work is refused it stays refused (`stopped`), so a run never flips back and forth.

Under torch.distributed the decision can be made collectively (`sync=True`, a MIN all-reduce of the verdict):
ranks that must run the same collective ops (all-reduced TTT gradients) then agree. Work that is local to a
rank (a LoRA step on its own documents) decides locally with `sync=False`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class EvalBudget:
    def __init__(self, limit_seconds: float = 600.0, margin_seconds: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter, device: torch.device | None = None):
        self.limit = float(limit_seconds)
        self.margin = float(margin_seconds)
        self.clock = clock
        self.device = device
        self.start = clock()
        self.seconds: dict[str, float] = {}
        self.skipped: dict[str, int] = {}
        self.stopped: set[str] = set()

    def _sync_device(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.limit - self.elapsed()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block (GPU work included) to `seconds[name]`."""
        self._sync_device()
        t0 = self.clock()
        try:
            yield
        finally:
            self._sync_device()
            self.seconds[name] = self.seconds.get(name, 0.0) + (self.clock() - t0)

    def allow(self, name: str, estimate_seconds: float = 0.0, reserve_seconds: float = 0.0,
              sync: bool = True) -> bool:
        """May optional work `name` (expected to take `estimate_seconds`) run now?

        `reserve_seconds` is what the mandatory remainder (scoring the rest) is expected to need.
        """
        if name in self.stopped:
            verdict = False
        else:
            verdict = self.elapsed() + estimate_seconds + reserve_seconds + self.margin <= self.limit
        if sync and _distributed():
            flag = torch.tensor([1 if verdict else 0], dtype=torch.int32,
                                device=self.device if self.device is not None else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            verdict = bool(flag.item())
        if not verdict:
            self.stopped.add(name)
            self.skipped[name] = self.skipped.get(name, 0) + 1
        return verdict

    def report(self) -> dict:
        return {"seconds": dict(self.seconds), "skipped": dict(self.skipped),
                "elapsed": self.elapsed(), "limit": self.limit}
