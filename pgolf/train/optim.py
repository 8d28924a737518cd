"""The training optimizer: Muon (MuonEq-R, Polar Express Newton-Schulz) for the matrix banks, AdamW for the rest.

`build_optimizer(param_groups, cfg)` returns one object the trainer drives:

    opt.set_lr_scale(schedule(t)); opt.set_step(step)   # LR schedule and momentum warmup
    loss.backward(); opt.step(); opt.zero_grad()     # step() consumes (may overwrite) the gradients

Groups, by the key the model gives them: "matrix" (2-D weights, or 3-D banks of matrices) -> Muon; "embed",
"scalar" and "head" -> AdamW. Weight decay is decoupled and scaled by the current LR (p *= 1 - lr*wd) in every
group. Gradient clipping (if `grad_clip_norm` > 0) uses the global norm over all groups, as
`clip_grad_norm_` over the model would, and never syncs the host.

Muon for one matrix with gradient G (fp32 momentum buffer M):
    M <- mu*M + G;  U = G + mu*M (Nesterov) or M;  U <- U / ||U_row|| per row (MuonEq-R);
    O = NewtonSchulz(U);  W <- W*(1 - lr*wd) - lr*sqrt(max(1, rows/cols))*O
Matrices of one shape are stacked and orthogonalized together (one batched call per shape). With a process
group of several ranks, `pgolf.train.parallel` shards that work (Parallel Muon) and also averages the
gradients of every other group: do not wrap the model in DDP then.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from pgolf.kernels.newton_schulz import SCHEDULES, newton_schulz

ADAM_GROUPS = ("embed", "scalar", "head")
GROUPS = ("matrix",) + ADAM_GROUPS


@dataclass
class OptimConfig:
    """Optimizer settings; defaults follow the record line (PR #1855 and its parents)."""

    matrix_lr: float = field(default=0.026, metadata={"help": "Muon learning rate of the matrix banks"})
    embed_lr: float = field(default=0.03, metadata={"help": "AdamW LR of the (tied) token embedding; untied "
                                                            "input-only embeddings used 0.6 in older records"})
    scalar_lr: float = field(default=0.02, metadata={"help": "AdamW LR of scalars, gains, gates and vectors"})
    head_lr: float = field(default=0.008, metadata={"help": "AdamW LR of an untied output head"})
    muon_momentum: float = field(default=0.97, metadata={"help": "Muon momentum after warmup"})
    muon_momentum_warmup_start: float = field(default=0.92, metadata={"help": "Muon momentum at step 0"})
    muon_momentum_warmup_steps: int = field(default=1500, metadata={
        "help": "steps of the linear momentum ramp from warmup_start to muon_momentum (0: none)"})
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum in Muon"})
    ns_steps: int = field(default=5, metadata={"help": "Newton-Schulz iterations"})
    ns_schedule: str = field(default="polar_express", metadata={
        "help": "Newton-Schulz coefficients: polar_express (per-step tuples) or classic"})
    muon_eq_r: bool = field(default=True, metadata={
        "help": "MuonEq-R: divide each row of the Muon update by its L2 norm before Newton-Schulz"})
    muon_wd: float = field(default=0.095, metadata={"help": "decoupled weight decay of the matrix banks"})
    embed_wd: float = field(default=0.085, metadata={"help": "decoupled weight decay of the embedding"})
    scalar_wd: float = field(default=0.02, metadata={"help": "decoupled weight decay of the scalar group"})
    head_wd: float = field(default=0.02, metadata={"help": "decoupled weight decay of the head"})
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    beta2: float = field(default=0.95, metadata={"help": "Adam beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    grad_clip_norm: float = field(default=0.3, metadata={"help": "clip the global grad norm to this (0: off)"})

    def __post_init__(self) -> None:
        if self.ns_schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.ns_schedule={self.ns_schedule!r}; choose from {sorted(SCHEDULES)}")
        if self.ns_steps < 1:
            raise ValueError(f"OptimConfig.ns_steps must be >= 1, not {self.ns_steps}")


def momentum_at(cfg: OptimConfig, step: int) -> float:
    """Muon momentum at `step`: a linear ramp from warmup_start to muon_momentum."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(max(step, 0) / cfg.muon_momentum_warmup_steps, 1.0)
    return cfg.muon_momentum_warmup_start + frac * (cfg.muon_momentum - cfg.muon_momentum_warmup_start)


def update_scale(rows: int, cols: int) -> float:
    """Muon's per-shape LR multiplier sqrt(max(1, rows/cols))."""
    return math.sqrt(max(1.0, rows / cols))


def row_normalize(u: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """MuonEq-R: each row divided by its L2 norm (a zero row stays zero)."""
    return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(eps).to(u.dtype)


def muon_direction(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool,
                   eq_r: bool) -> torch.Tensor:
    """Momentum step on `buf` (in place) and the update that goes into Newton-Schulz. `grad` may be overwritten."""
    buf.mul_(momentum).add_(grad)
    u = grad.add_(buf, alpha=momentum) if nesterov else buf.clone()
    return row_normalize(u) if eq_r else u


def make_plan(cfg: OptimConfig, shapes: list[tuple[int, int, int]], device: torch.device) -> Any:
    """A captured Triton Newton-Schulz plan for these (B, m, n) stacks on CUDA; None elsewhere (then the
    batched `newton_schulz` calls and plain torch ops run)."""
    from pgolf.kernels import newton_schulz as ns
    from pgolf.kernels.dispatch import use_triton

    if shapes and device.type == "cuda" and use_triton(torch.empty(0, device=device)):
        return ns.NewtonSchulzPlan(shapes, cfg.ns_steps, cfg.ns_schedule, device=device)
    return None


def orthogonalize(plan: Any, grads: list[torch.Tensor], bufs: list[torch.Tensor], momentum: float,
                  cfg: OptimConfig, grad_scale: torch.Tensor | None) -> list[torch.Tensor]:
    """Momentum, MuonEq-R and Newton-Schulz for (B, m, n) stacks; fused kernels into `plan` when given.
    `grads` may be overwritten."""
    if plan is not None:
        from pgolf.kernels.newton_schulz import muon_direction_into

        for g, buf, dst in zip(grads, bufs, plan.inputs):
            muon_direction_into(g, buf, dst, momentum, cfg.nesterov, cfg.muon_eq_r, grad_scale)
        return plan.run()
    out = []
    for g, buf in zip(grads, bufs):
        if grad_scale is not None:
            g.mul_(grad_scale)
        out.append(newton_schulz(muon_direction(g, buf, momentum, cfg.nesterov, cfg.muon_eq_r),
                                 cfg.ns_steps, cfg.ns_schedule))
    return out


class MatrixBank:
    """The matrices of one shape (m, n): 2-D parameters and slices of 3-D banks, stacked as (count, m, n)."""

    def __init__(self, shape: tuple[int, int], params: list[nn.Parameter]):
        self.shape = shape
        self.params = params
        self.counts = [1 if p.dim() == 2 else p.shape[0] for p in params]
        self.count = sum(self.counts)
        self.scale = update_scale(*shape)

    def grads(self) -> list[torch.Tensor]:
        m, n = self.shape
        return [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1, m, n) for p in self.params]

    def stacked_grad(self) -> torch.Tensor | None:
        """The gradient as (count, m, n) fp32 without a copy, when the bank is one contiguous fp32 3-D tensor."""
        p = self.params[0]
        if len(self.params) == 1 and p.dim() == 3 and p.grad is not None and p.grad.dtype == torch.float32 \
                and p.grad.is_contiguous():
            return p.grad
        return None

    def gather_grads(self, out: torch.Tensor) -> torch.Tensor:
        """Stack the gradients into `out[:count]` (fp32; missing gradients count as zero) and zero the padding."""
        grads = self.grads()
        if grads[0].dtype == out.dtype:
            torch.cat(grads, out=out[: self.count])
        else:
            out[: self.count].copy_(torch.cat(grads))
        out[self.count:].zero_()
        return out

    @torch.no_grad()
    def apply(self, update: torch.Tensor, lr: float, wd: float) -> None:
        """W <- W*(1 - lr*wd) - lr*scale*O for each matrix, O = `update[:count]` (any dtype)."""
        if update.is_cuda and all(p.is_contiguous() for p in self.params):
            from pgolf.kernels.newton_schulz import muon_apply

            for p, o in zip(self.params, update[: self.count].split(self.counts)):
                muon_apply(p, o, lr, wd, self.scale)
            return
        if wd:
            torch._foreach_mul_(self.params, 1.0 - lr * wd)
        pieces = update[: self.count].to(self.params[0].dtype).split(self.counts)
        torch._foreach_add_(self.params, [o.view_as(p) for o, p in zip(pieces, self.params)],
                            alpha=-lr * self.scale)


def make_banks(params: Iterable[nn.Parameter]) -> list[MatrixBank]:
    """Group matrix parameters by their matrix shape, in order of first appearance."""
    by_shape: dict[tuple[int, int], list[nn.Parameter]] = {}
    for p in params:
        if p.dim() not in (2, 3):
            raise ValueError(f"pgolf.train.optim: a 'matrix' parameter must be 2-D or a 3-D bank, got shape "
                             f"{tuple(p.shape)}; put vectors and scalars in the 'scalar' group")
        by_shape.setdefault(tuple(p.shape[-2:]), []).append(p)
    return [MatrixBank(shape, ps) for shape, ps in by_shape.items()]


class Muon:
    """Single-process Muon over matrix banks; the optimizer object calls it."""

    def __init__(self, params: list[nn.Parameter], cfg: OptimConfig):
        self.cfg = cfg
        self.banks = make_banks(params)
        self.bufs = [torch.zeros((b.count, *b.shape), device=b.params[0].device, dtype=torch.float32)
                     for b in self.banks]
        self.stacked: list[torch.Tensor] = [torch.empty_like(buf) for buf in self.bufs]
        self.grads: list[torch.Tensor] = list(self.stacked)
        self.plan = make_plan(cfg, [tuple(b.shape) for b in self.bufs], self._device())

    def prepare(self) -> None:
        """Stack the gradients of each bank (a 3-D bank's own gradient is used in place, and overwritten)."""
        for i, bank in enumerate(self.banks):
            own = bank.stacked_grad()
            self.grads[i] = own if own is not None else bank.gather_grads(self.stacked[i])

    def grad_sq_norm(self) -> torch.Tensor:
        """Sum of squares of all bank gradients (after `prepare`)."""
        return sum((torch.linalg.vector_norm(g).square() for g in self.grads), torch.zeros((), device=self._device()))

    def _device(self) -> torch.device:
        return self.bufs[0].device if self.bufs else torch.device("cpu")

    @torch.no_grad()
    def update(self, lr: float, wd: float, momentum: float, grad_scale: torch.Tensor | None) -> None:
        outs = orthogonalize(self.plan, self.grads, self.bufs, momentum, self.cfg, grad_scale)
        for bank, o in zip(self.banks, outs):
            bank.apply(o, lr, wd)

    def finish(self) -> None:
        """Nothing is in flight in one process (Parallel Muon applies its gathered updates here)."""

    def momentum_buffers(self) -> list[torch.Tensor]:
        return list(self.bufs)

    def load_momentum_buffers(self, bufs: list[torch.Tensor]) -> None:
        check_buffers(self.bufs, bufs)
        for mine, theirs in zip(self.bufs, bufs):
            mine.copy_(theirs)


def check_buffers(mine: list[torch.Tensor] | list[tuple[int, ...]], theirs: list[torch.Tensor]) -> None:
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t) for t in mine]
    got = [tuple(t.shape) for t in theirs]
    if shapes != got:
        raise ValueError(f"pgolf.train.optim: Muon state holds banks {got}, this model has {shapes}")


class MuonAdam:
    """Muon for the "matrix" group and AdamW for the others, as one optimizer (see the module docstring)."""

    def __init__(self, param_groups: dict[str, list[nn.Parameter]], cfg: OptimConfig, process_group: Any = None):
        unknown = set(param_groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"pgolf.train.optim: unknown parameter groups {sorted(unknown)}; expected {GROUPS}")
        self.cfg = cfg
        self.lr_scale = 1.0
        self.step_count = 0
        self.momentum = momentum_at(cfg, 0)
        matrix = [p for p in param_groups.get("matrix", []) if p.requires_grad]
        lrs = {"embed": cfg.embed_lr, "scalar": cfg.scalar_lr, "head": cfg.head_lr}
        wds = {"embed": cfg.embed_wd, "scalar": cfg.scalar_wd, "head": cfg.head_wd}
        groups = [{"params": [p for p in param_groups[k] if p.requires_grad], "name": k, "base_lr": lrs[k],
                   "lr": lrs[k], "weight_decay": wds[k]} for k in ADAM_GROUPS if param_groups.get(k)]
        self.adam_params = [p for g in groups for p in g["params"]]
        self.all_params = matrix + self.adam_params
        if not self.all_params:
            raise ValueError("pgolf.train.optim: no trainable parameters given")
        self.adam = None
        if self.adam_params:
            fused = all(p.is_cuda for p in self.adam_params)
            self.adam = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused or None)
        world = torch.distributed.get_world_size(process_group) if process_group is not None else 1
        if world > 1:
            from pgolf.train.parallel import PackedAllReduce, ParallelMuon

            self.muon = ParallelMuon(matrix, cfg, process_group)
            self.small_sync: Any = PackedAllReduce(self.adam_params, process_group)
        else:
            self.muon = Muon(matrix, cfg)
            self.small_sync = None
        self._synced = False

    # ---- schedule ------------------------------------------------------------------------------------------
    def set_lr_scale(self, scale: float) -> None:
        """Multiply every group's base LR by `scale` (the LR schedule's value now)."""
        self.lr_scale = float(scale)
        if self.adam is not None:
            for g in self.adam.param_groups:
                g["lr"] = g["base_lr"] * self.lr_scale

    def set_step(self, step: int) -> None:
        """Tell the optimizer the training step (drives the momentum warmup)."""
        self.step_count = int(step)
        self.momentum = momentum_at(self.cfg, self.step_count)

    def lrs(self) -> dict[str, float]:
        out = {"matrix": self.cfg.matrix_lr * self.lr_scale}
        if self.adam is not None:
            out.update({g["name"]: g["lr"] for g in self.adam.param_groups})
        return out

    # ---- step ----------------------------------------------------------------------------------------------
    def start_grad_sync(self) -> None:
        """Launch the gradient communication now (call right after backward to overlap it); step() does it
        itself when it was not called. Single-process: only stacks the bank gradients."""
        if self._synced:
            return
        self._synced = True
        if self.small_sync is not None:
            self.small_sync.launch()
        self.muon.prepare()

    @torch.no_grad()
    def step(self) -> None:
        self.start_grad_sync()
        if self.small_sync is not None:
            self.small_sync.wait()
        scale = self._clip_scale()
        lr = self.cfg.matrix_lr * self.lr_scale
        self.muon.update(lr, self.cfg.muon_wd, self.momentum, scale)
        if self.adam is not None:
            self.adam.step()
        self.muon.finish()
        self._synced = False

    def _clip_scale(self) -> torch.Tensor | None:
        """min(1, max_norm/(norm + 1e-6)) over all gradients, as a device tensor; applied to the Adam grads here."""
        if self.cfg.grad_clip_norm <= 0:
            return None
        adam_grads = [p.grad for p in self.adam_params if p.grad is not None]
        sq = self.muon.grad_sq_norm()
        if adam_grads:
            sq = sq + torch.nn.utils.get_total_norm(adam_grads, 2.0).to(sq.device).square()
        scale = (self.cfg.grad_clip_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        if adam_grads:
            torch._foreach_mul_(adam_grads, scale.to(adam_grads[0].device))
        return scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.all_params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Full state; under Parallel Muon this gathers the momentum shards (call it on every rank)."""
        return {"step": self.step_count, "lr_scale": self.lr_scale,
                "muon": [b.detach().clone() for b in self.muon.momentum_buffers()],
                "adam": self.adam.state_dict() if self.adam is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_step(state["step"])
        self.set_lr_scale(state["lr_scale"])
        self.muon.load_momentum_buffers(state["muon"])
        if self.adam is not None:
            self.adam.load_state_dict(state["adam"])


def build_optimizer(param_groups: dict[str, list[nn.Parameter]], cfg: OptimConfig,
                    process_group: Any = None) -> MuonAdam:
    """The trainer's optimizer. `process_group`: a torch.distributed group; with more than one rank the
    optimizer averages all gradients itself (Parallel Muon for the banks, one packed all-reduce for the rest)."""
    return MuonAdam(param_groups, cfg, process_group)
