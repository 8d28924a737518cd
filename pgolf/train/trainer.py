"""The training loop: a wall-clock budget, gradient accumulation, averaging, validation, checkpoints.

One code path for a plain process and for torchrun (NCCL on CUDA, gloo on CPU). The model is not wrapped in
DDP: the optimizer averages every gradient across ranks itself (Parallel Muon for the matrix banks, one
packed all-reduce for the rest), and all ranks start from rank 0's weights.

A step: `grad_accum_steps` micro-batches (forward under bf16 autocast on CUDA, backward of loss/accum), then
the optimizer step at the schedule's LR scale, then the EMA/SWA update. After each step one small all-reduce
carries [loss, elapsed seconds, save request] so that every rank agrees on the loss (a non-finite one stops
the run), on the clock (the schedule and the stop are identical on all ranks) and on SIGUSR1 saves.

Warm-up (torch.compile, CUDA graphs of the kernels) runs `warmup_steps` real steps -- and as many again with
recurrence on when the model loops -- and then restores weights, optimizer, loader and RNG, so the timed
run starts from exactly the state it would have had without them. Validation and checkpoint writing pause
the clock. Validation runs the eager module (no recompilation for eval shapes).

Outputs in OUT_DIR: config.json, metrics.jsonl, checkpoint/ (resumable), final.pt (averaged weights).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pgolf

from pgolf.kernels.dispatch import say_once
from pgolf.train import checkpoint as ckpt
from pgolf.train import distributed as pdist
from pgolf.train.averaging import WeightAverager
from pgolf.train.config import TrainConfig, grad_accum_for, validate
from pgolf.train.metrics import MetricsLogger, format_progress, write_config
from pgolf.quant.qat import qat_active
from pgolf.train.schedule import Clock, Schedule, recurrence_due


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; nothing was written after the last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    elapsed_s: float
    stop_reason: str
    """"budget" (the clock ran out), "iterations" (the step limit) or "halt" (halt_after_step)."""
    val_loss: float | None = None
    val_bpb: float | None = None
    weights: str | None = None
    """Which weights final.pt holds: "ema", "swa" or "raw"."""
    final_path: Path | None = None
    checkpoint_path: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Trainer:
    """Builds model, optimizer, loader and logs from the three configs; `run()` trains and exports."""

    def __init__(self, model_cfg: Any, train_cfg: TrainConfig, optim_cfg: Any,
                 dist_info: pdist.DistInfo | None = None, quant_cfg: Any = None) -> None:
        from pgolf.data.loader import TokenLoader
        from pgolf.model import GPT
        from pgolf.train.optim import build_optimizer

        validate(train_cfg)
        self.model_cfg, self.cfg, self.optim_cfg = model_cfg, train_cfg, optim_cfg
        self.info = dist_info or pdist.init_distributed(train_cfg.device)
        self.device = self.info.device
        self.is_cuda = self.device.type == "cuda"
        self.out_dir = Path(train_cfg.out_dir)
        self.seq_len = model_cfg.seq_len
        world = self.info.world_size
        self.accum = grad_accum_for(train_cfg, world, self.seq_len)
        self.rows_per_micro = train_cfg.train_batch_tokens // (world * self.accum * self.seq_len)
        if self.is_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")

        seed_everything(train_cfg.seed)
        self.model = GPT(model_cfg).to(self.device)
        pdist.broadcast_tensors_(list(self.model.state_dict().values()))
        group = torch.distributed.group.WORLD if self.info.distributed else None
        self.optimizer = build_optimizer(self.model.param_groups(), optim_cfg, process_group=group)
        self.loader = TokenLoader(train_cfg.train_files, self.rows_per_micro, self.seq_len, rank=self.info.rank,
                                  world_size=world, vocab_size=model_cfg.vocab_size, packing=train_cfg.packing,
                                  sampler=train_cfg.sampler, seed=train_cfg.seed, device=self.device)
        self.schedule = Schedule.from_config(train_cfg)
        self.averager = WeightAverager(self.model, train_cfg.ema_decay, train_cfg.swa, train_cfg.swa_every,
                                       train_cfg.swa_start_scale, train_cfg.ema_warmup)
        self.metrics = MetricsLogger(self.out_dir, enabled=self.info.is_main)
        self.clock = self._new_clock(0.0)
        self.looped = bool(getattr(model_cfg, "looped", False))
        self.recurrence_active = False
        self.quant_cfg = quant_cfg
        """A QuantConfig whose `qat` switch turns fake quantization on at `qat_start_frac` of the run."""
        self.qat_active = False
        self.step = 0
        self.elapsed = 0.0
        self._save_requested = False
        self._phase_steps = {False: 0, True: 0}
        self._phase_seconds = {False: 0.0, True: 0.0}
        self._use_compile = train_cfg.compile == "on" or (train_cfg.compile == "auto" and self.is_cuda)
        self._fullgraph = train_cfg.compile_fullgraph
        self._forwards: dict[bool, Any] = {}
        self.forward = self._forward_for(False)
        self.val_tokens: np.ndarray | None = None
        self.byte_tables = None
        if train_cfg.final_val or train_cfg.val_every > 0:
            self._load_validation()

    # ---- setup ---------------------------------------------------------------------------------------------
    def _new_clock(self, elapsed: float) -> Clock:
        return Clock(elapsed, sync=torch.cuda.synchronize if self.is_cuda else None)

    def _forward_for(self, qat: bool):
        """The (compiled) training forward without or with QAT, built once each: the warm-up compiles both, so
        switching QAT on mid-run costs no compile."""
        if qat not in self._forwards:
            module = self.model
            if qat:
                from pgolf.quant.qat import QATForward, qat_plan

                module = QATForward(self.model, qat_plan(self.model, self.quant_cfg))
            if self._use_compile and self.cfg.compile_scope == "blocks":
                if not self.model.blocks_compiled:
                    self.model.compile_blocks(self._fullgraph)
            elif self._use_compile:
                module = torch.compile(module, fullgraph=self._fullgraph, dynamic=False)
            self._forwards[qat] = module
        return self._forwards[qat]

    def _set_qat(self, active: bool) -> None:
        self.qat_active = active
        self.forward = self._forward_for(active)

    def _load_validation(self) -> None:
        """Validation tokens and byte tables, loaded up front so a missing file fails before training."""
        from pgolf.data.loader import load_validation_tokens
        from pgolf.data.tokenizer import VocabMismatchError, load_tokenizer
        from pgolf.eval.bpb import build_byte_tables

        sp = load_tokenizer(self.cfg.tokenizer_path)
        if sp.vocab_size() > self.model_cfg.vocab_size:
            raise VocabMismatchError(f"{self.cfg.tokenizer_path} has vocab {sp.vocab_size()}, more than the "
                                     f"model's vocab_size {self.model_cfg.vocab_size}")
        self.byte_tables = build_byte_tables(sp, self.model_cfg.vocab_size, device=self.device)
        tokens = load_validation_tokens(self.cfg.val_files, self.model_cfg.vocab_size, self.seq_len)
        if self.cfg.val_tokens > 0:
            windows = min((len(tokens) - 1) // self.seq_len, max(1, self.cfg.val_tokens // self.seq_len))
            tokens = tokens[: windows * self.seq_len + 1]
        self.val_tokens = tokens

    def _autocast(self):
        if self.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _say(self, text: str) -> None:
        self.metrics.say(text)

    # ---- one step ------------------------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            return self.forward(x, y)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as exc:  # e.g. data-dependent branches
            if not (self._use_compile and self._fullgraph):
                raise
            say_once("trainer-fullgraph", f"pgolf.train: the model does not compile as one graph ({exc}); "
                                          f"compiling with graph breaks instead")
            self._fullgraph = False
            self._forwards.clear()
            self.model.uncompile_blocks()
            self.forward = self._forward_for(self.qat_active)
            return self.forward(x, y)

    def _train_step(self, step: int, lr_scale: float) -> torch.Tensor:
        """One optimizer step (index `step`, 0-based) over all micro-batches; returns the mean loss (device)."""
        self.model.train()
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for _ in range(self.accum):
            x, y = self.loader.next_batch()
            with self._autocast():
                loss = self._loss(x, y)
            (loss / self.accum).backward()
            total += loss.detach().float()
        self.optimizer.start_grad_sync()
        self.optimizer.set_lr_scale(lr_scale)
        self.optimizer.set_step(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / self.accum

    def _agree(self, loss: torch.Tensor) -> tuple[float, float, bool]:
        """(mean loss over ranks, training seconds, save requested), identical on every rank."""
        world = self.info.world_size
        elapsed = self.clock.elapsed()
        vals = torch.stack([loss.double(), loss.new_tensor(elapsed / world, dtype=torch.float64),
                            loss.new_tensor(float(self._save_requested), dtype=torch.float64)])
        pdist.all_reduce_sum_(vals)
        loss_sum, elapsed_sum, saves = vals.tolist()
        self._save_requested = False
        return loss_sum / world, elapsed_sum, saves > 0

    def _set_recurrence(self, active: bool) -> None:
        self.model.set_recurrence(active)
        self.recurrence_active = active

    # ---- warm-up -------------------------------------------------------------------------------------------
    def _warmup(self) -> None:
        """Compile and tune on real steps, then put every piece of state back as it was."""
        n = self.cfg.warmup_steps
        if n <= 0:
            return
        t0 = time.perf_counter()
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_state = copy.deepcopy(self.optimizer.state_dict())
        loader_state = self.loader.state_dict()
        rng = copy.deepcopy(rng_state())
        qat_modes = [False, True] if self.quant_cfg is not None and self.quant_cfg.qat else [False]
        for qat in qat_modes:
            self._set_qat(qat)
            for loops in ([False, True] if self.looped else [False]):
                if self.looped:
                    self._set_recurrence(loops)
                for i in range(n):
                    self._train_step(i, 1.0)
        self._set_qat(False)
        if self.looped:
            self._set_recurrence(False)
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(opt_state)
        self.optimizer.zero_grad(set_to_none=True)
        self.loader.load_state_dict(loader_state)
        set_rng_state(rng)
        if self.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        graphs = (2 if self.looped else 1) * len(qat_modes)
        self.metrics.log("event", event="warmup", step=0, steps=n * graphs, seconds=seconds)
        self._say(f"warm-up: {n} steps x {graphs} graph(s) (recurrence off/on, QAT off/on as configured) in "
                  f"{seconds:.1f} s, state restored")

    # ---- validation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> tuple[float, float, int]:
        """(val_loss nats/token, val_bpb, tokens scored) of the current weights over this run's val tokens.

        Disjoint windows of seq_len, split in contiguous blocks over the ranks; sums in float64, reduced.
        """
        from pgolf.eval.bpb import BpbAccumulator

        if self.val_tokens is None:
            self._load_validation()
        T = self.seq_len
        windows = (len(self.val_tokens) - 1) // T
        start = windows * self.info.rank // self.info.world_size
        end = windows * (self.info.rank + 1) // self.info.world_size
        rows = max(1, self.cfg.val_batch_tokens // T)
        acc = BpbAccumulator(self.byte_tables, device=self.device)
        was_training = self.model.training
        self.model.eval()
        with self.model.eager_blocks():
            for s in range(start, end, rows):
                e = min(s + rows, end)
                chunk = torch.from_numpy(self.val_tokens[s * T: e * T + 1].astype(np.int64)).to(self.device)
                x, y = chunk[:-1].view(-1, T), chunk[1:].view(-1, T)
                with self._autocast():
                    nll = self.model(x, y, reduction="none")
                acc.add(nll.float(), x, y)
        acc.all_reduce()
        self.model.train(was_training)
        return acc.loss(), acc.bpb(), acc.token_count

    def _validate_and_log(self, weights: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss, bpb, n = self.validate()
        seconds = time.perf_counter() - t0
        self.metrics.log("val", step=self.step, val_loss=loss, val_bpb=bpb, val_tokens=n, weights=weights,
                         elapsed_s=self.elapsed, seconds=seconds)
        self._say(f"step {self.step} val_loss {loss:.4f} val_bpb {bpb:.4f} ({weights} weights, {n} tokens, "
                  f"{seconds:.1f} s)")
        return loss, bpb

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _weights_finite(self) -> bool:
        flags = torch.stack([t.isfinite().all() for t in self.model.state_dict().values() if t.is_floating_point()])
        return bool(flags.all())

    def save_checkpoint(self) -> Path:
        """Collective: every rank writes its part of OUT_DIR/checkpoint (see pgolf.train.checkpoint)."""
        if not self._weights_finite():
            self._diverged(float("nan"), what="weights")
        opt_state = self.optimizer.state_dict()  # a collective under Parallel Muon: every rank calls it
        shared = {}
        if self.info.is_main:
            shared = {"step": self.step, "elapsed_s": self.elapsed, "model": self.model.state_dict(),
                      "optimizer": opt_state, "averager": self.averager.state_dict(),
                      "recurrence_active": self.recurrence_active, "qat_active": self.qat_active,
                      "model_config": dataclasses.asdict(self.model_cfg),
                      "train_config": dataclasses.asdict(self.cfg),
                      "optim_config": dataclasses.asdict(self.optim_cfg)}
        local = {"loader": self.loader.state_dict(), "rng": rng_state()}
        path = ckpt.save_checkpoint(self.out_dir, shared, local, self.info.rank, self.info.world_size)
        self.metrics.log("event", event="checkpoint", step=self.step, path=str(path))
        return path

    def load_checkpoint(self, path: Path) -> None:
        shared, local = ckpt.load_checkpoint(path, self.info.rank, self.info.world_size, map_location="cpu")
        saved_model = shared["model_config"]
        mine = dataclasses.asdict(self.model_cfg)
        diff = sorted(k for k in set(saved_model) | set(mine) if saved_model.get(k) != mine.get(k))
        if diff:
            raise ValueError(f"{path}: the checkpoint's model config differs from this run's in {diff}")
        self.model.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.averager.load_state_dict(shared["averager"], device=self.device)
        self.loader.load_state_dict(local["loader"])
        set_rng_state(local["rng"])
        self.step = int(shared["step"])
        self.elapsed = float(shared["elapsed_s"])
        self.clock = self._new_clock(self.elapsed)
        if shared.get("qat_active"):
            self._set_qat(True)
        if shared["recurrence_active"]:
            self._set_recurrence(True)

    def _diverged(self, loss: float, what: str = "loss") -> None:
        last = ckpt.find_checkpoint(self.out_dir / ckpt.CHECKPOINT_DIR)
        where = (f"the last good checkpoint is {last} (step {ckpt.read_meta(last)['step']})" if last
                 else "no checkpoint was written before it")
        subject = f"training loss is {loss}" if what == "loss" else "the weights hold NaN/inf values"
        msg = (f"pgolf.train: {subject} at step {self.step}; the run stopped there and wrote nothing after it; "
               f"{where}. Lower the learning rates or the clip norm, or resume from the checkpoint.")
        self.metrics.log("event", event="diverged", step=self.step, what=what, loss=loss,
                         checkpoint=str(last) if last else None)
        self._say(msg)
        raise TrainingDiverged(msg)

    # ---- the run -------------------------------------------------------------------------------------------
    def _describe(self) -> None:
        if not self.info.is_main:
            return
        self._say(self.model.describe())
        self._say(f"parameters: {self.model.num_params():,}")
        self._say(f"world size {self.info.world_size} ({self.info.backend or 'single process'}) on "
                  f"{self.device.type}; {self.cfg.train_batch_tokens:,} tokens/step = {self.info.world_size} "
                  f"ranks x {self.accum} micro-steps x {self.rows_per_micro} rows x {self.seq_len}; "
                  f"compile {self.cfg.compile_scope if self._use_compile else 'off'}")
        budget = self.schedule.budget_seconds
        self._say(f"budget: {f'{budget:.0f} s of training' if budget > 0 else 'no clock'}, at most "
                  f"{self.cfg.iterations} steps; warmdown {self.cfg.warmdown_frac:.2f} to floor "
                  f"{self.cfg.lr_floor}; averaging: {self.averager.describe()}")

    def _install_signal(self):
        if not hasattr(signal, "SIGUSR1"):
            return None
        try:
            return signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "_save_requested", True))
        except ValueError:  # not the main thread: no save-on-signal
            return None

    def run(self) -> TrainResult:
        """Train to the budget or the step limit, then export; resumes when `resume` says so."""
        previous_handler = self._install_signal()
        try:
            resume_path = ckpt.resolve_resume(self.cfg.resume, self.out_dir)
            if self.info.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                run_info = {"world_size": self.info.world_size, "grad_accum_steps": self.accum,
                            "rows_per_micro_batch": self.rows_per_micro, "device": str(self.device),
                            "num_params": self.model.num_params(),
                            "resumed_from": str(resume_path) if resume_path else None}
                write_config(self.out_dir, run_info, model=self.model_cfg, train=self.cfg, optim=self.optim_cfg)
            pdist.barrier()
            self._describe()
            if resume_path is None:
                self.metrics.reset()
                if self.info.is_main:
                    ckpt.clear_outputs(self.out_dir)
                pdist.barrier()
            self._warmup()
            if resume_path is not None:
                self.load_checkpoint(resume_path)
                self.metrics.truncate_after(self.step)
                self.metrics.log("event", event="resume", step=self.step, path=str(resume_path),
                                 elapsed_s=self.elapsed)
                self._say(f"resumed from {resume_path} at step {self.step}, {self.elapsed:.1f} s of budget used")
            return self._loop()
        finally:
            self.loader.close()
            self.metrics.close()
            if previous_handler is not None:
                signal.signal(signal.SIGUSR1, previous_handler)

    def _loop(self) -> TrainResult:
        cfg = self.cfg
        tokens_per_step = cfg.train_batch_tokens
        last_log_step, last_log_elapsed = self.step, self.elapsed
        since_launch = time.time() - pgolf.LAUNCH_TIME
        self.metrics.log("event", event="timed_start", step=self.step, since_launch_s=since_launch)
        self._say(f"launch to first timed step: {since_launch:.1f} s (data, model build, compile, warm-up)")
        self.clock.start()
        while True:
            if self.schedule.finished(self.step, self.elapsed):
                stop_reason = "iterations" if self.step >= cfg.iterations else "budget"
                break
            progress = self.schedule.progress(self.step, self.elapsed)
            if self.looped and not self.recurrence_active and recurrence_due(progress,
                                                                             self.model_cfg.loop_enable_frac):
                self._set_recurrence(True)
                self.metrics.log("event", event="recurrence_on", step=self.step, elapsed_s=self.elapsed,
                                 progress=progress)
                self._say(f"step {self.step}: recurrence on at {progress:.1%} of the run")
            if self.quant_cfg is not None and not self.qat_active and qat_active(self.quant_cfg, progress):
                self._set_qat(True)
                self.metrics.log("event", event="qat_on", step=self.step, elapsed_s=self.elapsed, progress=progress)
                self._say(f"step {self.step}: quantization-aware training on at {progress:.1%} of the run")
            scale = self.schedule.lr_scale(progress)
            loss_t = self._train_step(self.step, scale)
            self.step += 1
            self.averager.update(self.model, self.step, scale)
            before = self.elapsed
            loss, self.elapsed, save_now = self._agree(loss_t)
            self._phase_steps[self.recurrence_active] += 1
            self._phase_seconds[self.recurrence_active] += self.elapsed - before
            if not math.isfinite(loss):
                self.clock.pause()
                self._diverged(loss)
            last = self.schedule.finished(self.step, self.elapsed)
            if self.step <= 10 or self.step % max(cfg.log_every, 1) == 0 or last:
                steps = self.step - last_log_step
                window = max(self.elapsed - last_log_elapsed, 1e-9)
                ms = 1000.0 * window / max(steps, 1)
                tps = tokens_per_step * steps / window
                self.metrics.log("train", step=self.step, loss=loss, lr_scale=scale, elapsed_s=self.elapsed,
                                 ms_per_step=ms, tokens_per_s=tps, recurrence=self.recurrence_active)
                self._say(format_progress(self.step, cfg.iterations, loss, scale, ms, tps, self.elapsed,
                                          self.schedule.eta_seconds(self.step, self.elapsed, ms / 1000.0)))
                last_log_step, last_log_elapsed = self.step, self.elapsed
            if cfg.val_every > 0 and self.step % cfg.val_every == 0 and not last:
                self.clock.pause()
                self._validate_and_log("raw")
                self.clock.start()
            if save_now or (cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0 and not last):
                self.clock.pause()
                path = self.save_checkpoint()
                self._say(f"step {self.step}: checkpoint {path}")
                self.clock.start()
            if cfg.halt_after_step and self.step >= cfg.halt_after_step:
                self.clock.pause()
                self._say(f"step {self.step}: halted (halt_after_step), nothing more written")
                return TrainResult(self.step, self.elapsed, "halt")
        self.clock.pause()
        return self._finish(stop_reason)

    def speed_by_phase(self) -> dict[str, float]:
        """Mean ms/step and tokens/s of the timed steps of this process, without and with recurrence."""
        out = {}
        for active, name in ((False, "loop_off"), (True, "loop_on")):
            steps, seconds = self._phase_steps[active], self._phase_seconds[active]
            if steps and seconds > 0:
                out[f"ms_per_step_{name}"] = 1000.0 * seconds / steps
                out[f"tokens_per_s_{name}"] = self.cfg.train_batch_tokens * steps / seconds
        return out

    def _finish(self, stop_reason: str) -> TrainResult:
        cfg = self.cfg
        peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.is_cuda else None
        speed = self.speed_by_phase()
        self._say(f"stopped ({stop_reason}) at step {self.step} after {self.elapsed:.1f} s of training"
                  + (f"; peak memory {peak_mb:.0f} MiB" if peak_mb is not None else "")
                  + "".join(f"; {k} {v:,.1f}" for k, v in speed.items()))
        checkpoint_path = self.save_checkpoint()
        self.model.uncompile_blocks()  # what follows (validation, export, calibration) runs the eager blocks
        weights = self.averager.source
        export = self.averager.export_state(self.model)
        self.model.load_state_dict(export)
        val_loss = val_bpb = None
        if cfg.final_val:
            val_loss, val_bpb = self._validate_and_log(weights)
        final_path = self.out_dir / ckpt.FINAL_FILE
        if self.info.is_main:
            ckpt.save_final(final_path, dataclasses.asdict(self.model_cfg), export, dataclasses.asdict(cfg),
                            optim_config=dataclasses.asdict(self.optim_cfg), step=self.step,
                            elapsed_s=self.elapsed, weights=weights, recurrence_active=self.recurrence_active,
                            val_loss=val_loss, val_bpb=val_bpb)
        pdist.barrier()
        self.metrics.log("final", step=self.step, elapsed_s=self.elapsed, stop_reason=stop_reason,
                         val_loss=val_loss, val_bpb=val_bpb, weights=weights, peak_memory_mb=peak_mb,
                         recurrence=self.recurrence_active, final_path=str(final_path), **speed)
        self._say(f"wrote {final_path} ({weights} weights)"
                  + (f": val_loss {val_loss:.4f} val_bpb {val_bpb:.4f}" if val_bpb is not None else ""))
        return TrainResult(self.step, self.elapsed, stop_reason, val_loss, val_bpb, weights, final_path,
                           checkpoint_path)


def train(model_cfg: Any, train_cfg: TrainConfig, optim_cfg: Any) -> TrainResult:
    """Build a Trainer and run it (the process group, if any, stays up for the caller to tear down)."""
    return Trainer(model_cfg, train_cfg, optim_cfg).run()
