"""TrainConfig: everything about a training run that is neither the model nor the optimizer.

Filled like every pgolf config: defaults < preset < environment (FIELD_NAME) < `--field-name` flags.
The batch is global: `train_batch_tokens` tokens per optimizer step over all ranks and micro-steps, so a
1-GPU run with 8 micro-steps sees the same batches as the 8-GPU contest run (see `grad_accum_for`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

REFERENCE_WORLD_SIZE = 8
"""The contest machine has 8 GPUs; the automatic accumulation reproduces its batch on fewer ranks."""


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    train_files: str = field(default="data/datasets/fineweb10B_sp8192/fineweb_train_*.bin",
                             metadata=_h("glob of the training shards"))
    val_files: str = field(default="data/datasets/fineweb10B_sp8192/fineweb_val_*.bin",
                           metadata=_h("glob of the validation shards"))
    tokenizer_path: str = field(default="data/tokenizers/fineweb_8192_bpe.model",
                                metadata=_h("SentencePiece model whose byte counts make val_bpb exact"))
    seed: int = field(default=1337, metadata=_h("seed of the weights and of every RNG the run touches"))
    device: str = field(default="auto", metadata=_h("auto (cuda when present), cuda or cpu"))
    train_batch_tokens: int = field(default=786_432,
                                    metadata=_h("tokens per optimizer step over all ranks and micro-steps"))
    grad_accum_steps: int = field(default=0, metadata=_h(
        f"micro-steps per optimizer step; 0 = {REFERENCE_WORLD_SIZE} // world size (1 GPU reproduces the "
        f"{REFERENCE_WORLD_SIZE}-GPU batch)"))
    iterations: int = field(default=20_000, metadata=_h("maximum optimizer steps"))
    max_wallclock_seconds: float = field(default=600.0, metadata=_h(
        "training time budget in seconds (0 = none: the schedule runs on steps); warm-up, validation and "
        "checkpoint writing are not counted"))
    reserve_seconds: float = field(default=12.0, metadata=_h(
        "seconds of the budget kept for post-training work that must happen inside the window "
        "(GPTQ calibration on training data; the records reserve 10-12 s); training stops this much earlier"))
    packing: bool = field(default=False, metadata=_h(
        "document-aligned rows: each row starts at a BOS when one is near (skips document tails)"))
    sampler: str = field(default="sequential", metadata=_h(
        "order of training rows: sequential, or coprime (a stride permutation over all shards per epoch)"))
    warmup_steps: int = field(default=5, metadata=_h(
        "compile warm-up steps before the clock starts; model, optimizer, loader and RNG are restored "
        "after them (run once more with recurrence on when the model loops). Compiling happens in the first; "
        "on an H100 the record model's launch took 144 s with 2 and 230 s with 20"))
    warmdown_frac: float = field(default=0.85, metadata=_h("fraction of the budget over which the LR decays"))
    lr_floor: float = field(default=0.1, metadata=_h("LR scale never goes below this during warmdown"))
    ema_decay: float = field(default=0.9965, metadata=_h("EMA decay of the weights per step (0 = off)"))
    ema_warmup: bool = field(default=False, metadata=_h(
        "EMA decay min(ema_decay, (1+t)/(10+t)) at step t: short runs export trained weights, not their "
        "initialization; no published system uses it"))
    swa: bool = field(default=False, metadata=_h(
        "stochastic weight averaging; when on, the exported weights are the SWA average (else the EMA)"))
    swa_every: int = field(default=50, metadata=_h("steps between SWA snapshots"))
    swa_start_scale: float = field(default=0.2, metadata=_h(
        "SWA snapshots are taken only while the LR scale is below this (0.2 = 'tight SWA', "
        "1.0 = the whole warmdown)"))
    val_every: int = field(default=0, metadata=_h("validate every this many steps (0 = only at the end)"))
    val_tokens: int = field(default=0, metadata=_h("validate on the first this many tokens (0 = all)"))
    val_batch_tokens: int = field(default=131_072, metadata=_h("tokens per validation forward on each rank"))
    final_val: bool = field(default=True, metadata=_h("validate the exported weights at the end"))
    log_every: int = field(default=50, metadata=_h("console and metrics.jsonl line every this many steps"))
    checkpoint_every: int = field(default=0, metadata=_h(
        "write a resumable checkpoint every this many steps (0 = only at the end and on SIGUSR1)"))
    out_dir: str = field(default="runs/train", metadata=_h(
        "run directory: metrics.jsonl, config.json, checkpoint/, final.pt"))
    compile: str = field(default="auto", metadata=_h("torch.compile the model: auto (on CUDA), on, off"))
    compile_scope: str = field(default="model", metadata=_h(
        "what torch.compile covers: 'model' (one whole-model graph, most fusion) or 'blocks' (regional: the block "
        "is compiled once and reused across layers, a fraction of the compile time; the rest runs eager)"))
    compile_fullgraph: bool = field(default=True, metadata=_h(
        "compile with fullgraph=True (falls back to graph breaks with a warning when that fails)"))
    resume: str = field(default="", metadata=_h(
        "checkpoint directory to resume from; 'auto' = OUT_DIR/checkpoint when it exists"))
    halt_after_step: int = field(default=0, metadata=_h(
        "stop abruptly after this step, writing nothing more (simulates a kill; 0 = off)"))


def grad_accum_for(cfg: TrainConfig, world_size: int, seq_len: int) -> int:
    """Micro-steps per optimizer step on `world_size` ranks, checked against the batch shape.

    `seq_len` is the model's (ModelConfig.seq_len): one micro-batch is whole rows of it.
    """
    if cfg.grad_accum_steps > 0:
        accum = cfg.grad_accum_steps
    elif REFERENCE_WORLD_SIZE % world_size == 0:
        accum = REFERENCE_WORLD_SIZE // world_size
    else:
        raise ValueError(f"world size {world_size} does not divide {REFERENCE_WORLD_SIZE}: "
                         f"set --grad-accum-steps explicitly")
    per_micro = world_size * accum * seq_len
    if cfg.train_batch_tokens % per_micro:
        raise ValueError(f"train_batch_tokens={cfg.train_batch_tokens} is not a multiple of world_size "
                         f"({world_size}) x grad_accum_steps ({accum}) x seq_len ({seq_len})")
    return accum


def validate(cfg: TrainConfig) -> None:
    """Reject settings that would fail late or silently do something else."""
    if cfg.compile not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, not {cfg.compile!r}")
    if cfg.compile_scope not in ("model", "blocks"):
        raise ValueError(f"compile_scope must be model or blocks, not {cfg.compile_scope!r}")
    if cfg.sampler not in ("sequential", "coprime"):
        raise ValueError(f"sampler must be sequential or coprime, not {cfg.sampler!r}")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, not {cfg.device!r}")
    if not 0.0 <= cfg.warmdown_frac <= 1.0:
        raise ValueError(f"warmdown_frac must lie in [0, 1], not {cfg.warmdown_frac}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), not {cfg.ema_decay}")
    if cfg.max_wallclock_seconds > 0 and cfg.reserve_seconds >= cfg.max_wallclock_seconds:
        raise ValueError(f"reserve_seconds ({cfg.reserve_seconds}) leaves no training time out of "
                         f"max_wallclock_seconds ({cfg.max_wallclock_seconds})")
    if cfg.iterations <= 0:
        raise ValueError(f"iterations must be positive, not {cfg.iterations}")
    if cfg.swa and cfg.swa_every <= 0:
        raise ValueError(f"swa_every must be positive, not {cfg.swa_every}")
