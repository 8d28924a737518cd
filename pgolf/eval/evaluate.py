"""One entry point for every evaluation mode: `evaluate(model, val_tokens, tables, cfg) -> dict`.

The result holds val_loss (nats per token), val_bpb, tokens and bytes scored, and seconds per phase. Every
mode scores each of the N-1 targets of the stream exactly once (checked here after the all-reduce), so the
numbers of different modes are comparable. Under torch.distributed every rank calls it with the same
arguments and gets the same result; each rank scores its share (see the mode modules).
"""
from __future__ import annotations

import torch

from pgolf.eval.bpb import BpbAccumulator, ByteTables
from pgolf.eval.budget import EvalBudget
from pgolf.eval.chunks import run_chunks
from pgolf.eval.config import EvalConfig
from pgolf.eval.sliding import TokenRecorder, as_tokens, model_device, model_setting, run_sliding


def model_window(model: torch.nn.Module, cfg: EvalConfig) -> int:
    return cfg.resolved_window(model_setting(model, "seq_len", "train_seq_len", "max_seq_len"))


def evaluate(model: torch.nn.Module, val_tokens, tables: ByteTables, cfg: EvalConfig, *,
             recorder: TokenRecorder | None = None, budget: EvalBudget | None = None) -> dict:
    """Score the validation stream with `cfg.mode`; the caller's model weights are never changed.

    `recorder` (single process) receives every target's NLL; `budget` defaults to cfg's time limit, starting now.
    """
    tokens = as_tokens(val_tokens)
    if cfg.max_tokens:
        tokens = tokens[: cfg.max_tokens]
    device = model_device(model)
    window = model_window(model, cfg)
    budget = budget if budget is not None else EvalBudget(cfg.time_budget_seconds, cfg.budget_margin_seconds,
                                                          device=device)
    acc = BpbAccumulator(tables.to(device), device)
    was_training = model.training
    model.eval()
    try:
        if cfg.mode in ("chunks", "sliding"):
            forward = torch.compile(model, dynamic=False) if cfg.compile and device.type == "cuda" else model
            run = run_chunks if cfg.mode == "chunks" else run_sliding
            details = run(forward, model, tokens, acc, cfg, window, budget, recorder)
        elif cfg.mode == "ttt":
            from pgolf.eval.ttt import run_ttt
            details = run_ttt(model, tokens, acc, cfg, window, budget, recorder)
        else:
            from pgolf.eval.lora_ttt import run_lora_ttt
            details = run_lora_ttt(model, tokens, acc, cfg, window, budget, recorder)
    finally:
        model.train(was_training)
    acc.all_reduce()
    expected = len(tokens) - 1
    if acc.token_count != expected:
        raise RuntimeError(f"pgolf.eval.evaluate: mode {cfg.mode!r} scored {acc.token_count} targets, expected "
                           f"{expected} (every target exactly once)")
    report = budget.report()
    return {"mode": cfg.mode, "val_loss": acc.loss(), "val_bpb": acc.bpb(), "tokens": acc.token_count,
            "bytes": int(acc.byte_sum), "seconds": report["seconds"], "seconds_total": report["elapsed"],
            "skipped": report["skipped"], "window": window, "stride": cfg.stride, "doc_aware": cfg.doc_aware,
            **details}
