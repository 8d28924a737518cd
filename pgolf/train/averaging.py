"""Weight averaging: EMA every step and (tight) SWA snapshots late in the warmdown.

The averages are kept in fp32 on the model's device over the whole state_dict (floating entries; others are
taken from the model as they are). `WeightAverager.export_state` gives what the run exports and evaluates:
the SWA mean when SWA is on and has snapshots, else the EMA when its decay is > 0, else the raw weights.
"""
from __future__ import annotations

import torch
from torch import nn


def _float_items(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}


def _cast_like(model: nn.Module, averaged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state_dict of `model` with its floating entries replaced by `averaged`, in the model's dtypes."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = averaged[k].to(v.dtype).clone() if k in averaged else v.detach().clone()
    return out


class EMA:
    """shadow <- d * shadow + (1 - d) * weights, starting from the weights it is built with.

    d is `decay`, or with `warmup` min(decay, (1 + t) / (10 + t)) at optimizer step t (1-based): a run of a few
    hundred steps at decay 0.9965 would otherwise export weights that are still half its initialization
    (0.9965^200 = 0.50). The warm-up rate reaches 0.9965 at t = 2,562, so a record-length run (~4,500 steps) keeps
    all but a negligible share of its average's mass from the same late steps as without it.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay = decay
        self.warmup = warmup
        self.shadow = {k: v.float().clone() for k, v in _float_items(model).items()}

    def decay_at(self, step: int) -> float:
        """The decay applied after optimizer step `step` (1-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based; only the warm-up reads it)."""
        decay = self.decay_at(step)
        current = _float_items(model)
        keys = list(self.shadow)
        shadow = [self.shadow[k] for k in keys]
        live = [current[k].float() for k in keys]
        torch._foreach_mul_(shadow, decay)
        torch._foreach_add_(shadow, live, alpha=1.0 - decay)

    def averaged(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the model's parameters (different model config?)")
        self.decay = state["decay"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


class SWA:
    """Uniform mean of snapshots taken every `every` steps while the LR scale is below `start_scale`."""

    def __init__(self, every: int, start_scale: float) -> None:
        self.every = every
        self.start_scale = start_scale
        self.total: dict[str, torch.Tensor] | None = None
        self.count = 0

    def due(self, step: int, lr_scale: float) -> bool:
        return lr_scale < self.start_scale and step % self.every == 0

    @torch.no_grad()
    def add(self, model: nn.Module) -> None:
        current = _float_items(model)
        if self.total is None:
            self.total = {k: v.float().clone() for k, v in current.items()}
        else:
            keys = list(self.total)
            torch._foreach_add_([self.total[k] for k in keys], [current[k].float() for k in keys])
        self.count += 1

    def averaged(self) -> dict[str, torch.Tensor]:
        if self.total is None:
            raise RuntimeError("SWA has no snapshots yet")
        return {k: v / self.count for k, v in self.total.items()}

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        total = state["total"]
        self.total = None if total is None else {k: v.to(device) if device is not None else v
                                                 for k, v in total.items()}
        self.count = state["count"]


class WeightAverager:
    """The EMA and SWA of one run, updated after each optimizer step."""

    def __init__(self, model: nn.Module, ema_decay: float = 0.0, swa: bool = False, swa_every: int = 50,
                 swa_start_scale: float = 0.2, ema_warmup: bool = False) -> None:
        self.ema = EMA(model, ema_decay, ema_warmup) if ema_decay > 0 else None
        self.swa = SWA(swa_every, swa_start_scale) if swa else None

    def update(self, model: nn.Module, step: int, lr_scale: float) -> None:
        """Call after optimizer step number `step` (1-based) taken at LR scale `lr_scale`."""
        if self.ema is not None:
            self.ema.update(model, step)
        if self.swa is not None and self.swa.due(step, lr_scale):
            self.swa.add(model)

    @property
    def source(self) -> str:
        """Which weights `export_state` returns: "swa", "ema" or "raw"."""
        if self.swa is not None and self.swa.count > 0:
            return "swa"
        if self.ema is not None:
            return "ema"
        return "raw"

    def export_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The state_dict the run exports: averaged weights in the model's dtypes."""
        source = self.source
        if source == "swa":
            return _cast_like(model, self.swa.averaged())
        if source == "ema":
            return _cast_like(model, self.ema.averaged())
        return _cast_like(model, {})

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else self.ema.state_dict(),
                "swa": None if self.swa is None else self.swa.state_dict()}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restore from `state_dict()`; SWA sums move to `device` (EMA copies into its existing buffers)."""
        for name in ("ema", "swa"):
            mine, saved = getattr(self, name), state.get(name)
            if (mine is None) != (saved is None):
                raise ValueError(f"checkpoint {name} state does not match this run's averaging settings")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.swa is not None:
            self.swa.load_state_dict(state["swa"], device)

    def describe(self) -> str:
        parts = []
        if self.ema is not None:
            parts.append(f"EMA decay {self.ema.decay}" + (" with warm-up (1+t)/(10+t)" if self.ema.warmup else ""))
        if self.swa is not None:
            parts.append(f"SWA every {self.swa.every} steps below LR scale {self.swa.start_scale}")
        return " + ".join(parts) or "none (raw weights exported)"
