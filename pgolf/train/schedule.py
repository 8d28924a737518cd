"""The wall-clock schedule: how far along the run is, the LR scale there, and the clock that measures it.

Progress is the larger of elapsed/budget and step/iterations, so whichever limit binds first also ends the
warmdown. The LR scale is 1 until `1 - warmdown_frac`, then falls linearly towards 0 at progress 1 but never
below `lr_floor` (the published records' `max((1 - p) / warmdown_frac, min_lr)`). Recurrence switches on
once progress reaches the model's `loop_enable_frac`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Schedule:
    iterations: int
    budget_seconds: float = 0.0
    """Training seconds available (0 = no clock: progress counts steps only)."""
    warmdown_frac: float = 0.85
    lr_floor: float = 0.1

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        """Build from a TrainConfig: the budget is MAX_WALLCLOCK_SECONDS less the post-training reserve."""
        budget = cfg.max_wallclock_seconds - cfg.reserve_seconds if cfg.max_wallclock_seconds > 0 else 0.0
        return cls(cfg.iterations, budget, cfg.warmdown_frac, cfg.lr_floor)

    def progress(self, step: int, elapsed_s: float) -> float:
        """Fraction of the run done, in [0, inf): 1 means the budget or the step limit is reached."""
        frac = step / max(self.iterations, 1)
        if self.budget_seconds > 0:
            frac = max(frac, elapsed_s / self.budget_seconds)
        return frac

    def lr_scale(self, progress: float) -> float:
        if self.warmdown_frac <= 0 or progress < 1.0 - self.warmdown_frac:
            return 1.0
        return max((1.0 - progress) / self.warmdown_frac, self.lr_floor)

    def finished(self, step: int, elapsed_s: float) -> bool:
        return step >= self.iterations or (self.budget_seconds > 0 and elapsed_s >= self.budget_seconds)

    def eta_seconds(self, step: int, elapsed_s: float, seconds_per_step: float) -> float:
        """Seconds of training left: the sooner of the step limit at the current speed and the budget."""
        eta = max(self.iterations - step, 0) * seconds_per_step
        if self.budget_seconds > 0:
            eta = min(eta, max(self.budget_seconds - elapsed_s, 0.0))
        return eta


def recurrence_due(progress: float, enable_frac: float | None) -> bool:
    """Looping layers switch on once `progress` reaches `enable_frac` (None or negative: never)."""
    return enable_frac is not None and enable_frac >= 0 and progress >= enable_frac


class Clock:
    """Training time that can be paused (validation, checkpoints) and carried over a resume.

    `sync` (e.g. torch.cuda.synchronize) runs before each reading so queued GPU work is counted.
    """

    def __init__(self, elapsed_s: float = 0.0, sync: Callable[[], None] | None = None,
                 now: Callable[[], float] = time.perf_counter) -> None:
        self._base = elapsed_s
        self._started: float | None = None
        self._sync = sync
        self._now = now

    @property
    def running(self) -> bool:
        return self._started is not None

    def start(self) -> None:
        if self._started is None:
            if self._sync is not None:
                self._sync()
            self._started = self._now()

    def pause(self) -> None:
        if self._started is not None:
            if self._sync is not None:
                self._sync()
            self._base += self._now() - self._started
            self._started = None

    def elapsed(self) -> float:
        if self._started is None:
            return self._base
        if self._sync is not None:
            self._sync()
        return self._base + self._now() - self._started
