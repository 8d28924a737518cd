"""Score-first full-parameter test-time training (legal TTT, CHALLENGE.md).

The targets 1..N-1 are cut into chunks of `ttt_chunk_tokens`. For chunk c, in stream order:
  1. score: its targets are scored with the sliding windows of pgolf.eval.sliding (contexts may reach back into
     earlier, already scored chunks) under no_grad, with the weights adapted on chunks < c (or their EMA);
  2. train: `ttt_epochs` passes of SGD with momentum over the chunk's tokens (inputs x[lo-1:hi], labels
     x[lo:hi+1], all already scored), cut into sequences of `ttt_seq_len`; grad-norm clip; embeddings and the
     first `ttt_freeze_blocks` blocks can stay frozen; lr follows a cosine over the stream's chunks.
  The last chunk is never trained on (nothing is scored after it). A target's score therefore depends only on
  tokens before it: pgolf.eval.leak checks exactly that.

Distributed split: every rank holds the same weights. Scoring: the chunk's batches go round robin over ranks
and the byte/NLL sums are all-reduced once at the end. Training: each SGD step takes `ttt_batch_seqs`
sequences; rank r computes the gradient of its sequences r, r+world, ... (loss summed, divided by the step's
total token count), the flattened gradients are summed with one all-reduce, so every rank applies the same
mean-gradient update. The budget gate for training is collective (all ranks stop training together).

Training never touches the caller's model: the evaluator adapts a deep copy.
"""
from __future__ import annotations

import copy
import math
import re
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pgolf.eval.sliding import Forward, TokenRecorder, autocast, make_layout, model_device, plan_sliding, \
    rank_world, score_layout, segments

BLOCK_INDEX = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)\.")


def embedding_params(model: nn.Module) -> set[int]:
    """ids of embedding tables (nn.Embedding weights; a tied head shares the tensor, so it is included)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def select_params(model: nn.Module, freeze_embeddings: bool, freeze_blocks: int) -> list[nn.Parameter]:
    """Parameters TTT adapts: all, minus embeddings and the first `freeze_blocks` blocks when asked."""
    frozen = embedding_params(model) if freeze_embeddings else set()
    chosen, seen = [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or id(p) in frozen:
            continue
        seen.add(id(p))
        m = BLOCK_INDEX.search(name)
        if m is not None and int(m.group(1)) < freeze_blocks:
            continue
        chosen.append(p)
    return chosen


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum gradients over ranks in one flat all-reduce (missing grads count as zero)."""
    if not (dist.is_available() and dist.is_initialized()) or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def cosine_lr(base: float, index: int, count: int, enabled: bool) -> float:
    """base * (1 + cos(pi * index / (count - 1))) / 2: the peak at index 0, zero at index count - 1."""
    if not enabled or count <= 1:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(index, count - 1) / (count - 1)))


def sgd_pass(forward: Forward, params: list[nn.Parameter], opt: torch.optim.Optimizer, tokens: np.ndarray,
             lo: int, hi: int, seq_len: int, batch_seqs: int, epochs: int, grad_clip: float,
             device: torch.device, use_autocast: bool) -> int:
    """`epochs` passes of SGD on targets lo..hi (every one already scored). Returns optimizer steps taken.

    All ranks call this with the same arguments; they run the same number of steps (one all-reduce each).
    """
    rank, world = rank_world()
    starts = np.arange(lo - 1, hi, seq_len, dtype=np.int64)
    lengths = np.minimum(seq_len, hi - starts)
    steps = 0
    for _ in range(epochs):
        for g0 in range(0, len(starts), batch_seqs):
            group = np.arange(g0, min(g0 + batch_seqs, len(starts)))
            total = float(lengths[group].sum())
            mine = group[rank::world]
            opt.zero_grad(set_to_none=True)
            if len(mine):
                t = int(lengths[mine].max())
                x = np.zeros((len(mine), t), dtype=np.int64)
                y = np.zeros((len(mine), t), dtype=np.int64)
                mask = np.zeros((len(mine), t), dtype=np.float32)
                for i, s in enumerate(mine):
                    n = int(lengths[s])
                    x[i, :n] = tokens[starts[s]:starts[s] + n]
                    y[i, :n] = tokens[starts[s] + 1:starts[s] + n + 1]
                    mask[i, :n] = 1.0
                x_t, y_t = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                with torch.enable_grad(), autocast(device, use_autocast):
                    nll = forward(x_t, targets=y_t, reduction="none").float()
                    loss = (nll * torch.from_numpy(mask).to(device)).sum() / total
                if loss.requires_grad:  # False when no adapted parameter reaches the loss
                    loss.backward()
            all_reduce_grads(params)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            steps += 1
    opt.zero_grad(set_to_none=True)
    return steps


class WeightEMA:
    """EMA of the adapted weights; `swapped()` scores with the average and then restores the live weights."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def chunk_ranges(n_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Target ranges [lo, hi] of the chunks covering targets 1..n_tokens-1."""
    return [(lo, min(lo + chunk_tokens - 1, n_tokens - 1)) for lo in range(1, n_tokens, chunk_tokens)]


def run_ttt(model: nn.Module, tokens: np.ndarray, acc, cfg, window: int, budget,
            recorder: TokenRecorder | None = None) -> dict:
    """Mode "ttt": score-first TTT over the stream on a copy of `model` (module docstring)."""
    work = copy.deepcopy(model)
    work.eval()
    device = model_device(work)
    forward = torch.compile(work, dynamic=False) if cfg.compile and device.type == "cuda" else work
    for p in work.parameters():
        p.requires_grad_(False)
    params = select_params(work, cfg.ttt_freeze_embeddings, cfg.ttt_freeze_blocks)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    ema = WeightEMA(params, cfg.ttt_ema) if cfg.ttt_ema > 0 else None
    seq_len = cfg.ttt_seq_len or window
    seg = segments(tokens, cfg.doc_aware)
    chunks = chunk_ranges(len(tokens), cfg.ttt_chunk_tokens)
    score_s, train_s = [], []
    trained, steps = 0, 0
    for c, (lo, hi) in enumerate(chunks):
        t0 = time.perf_counter()
        lay = make_layout(plan_sliding(seg.restrict(lo, hi), window, cfg.stride), tokens, work, cfg, window)
        with budget.phase("score"):
            if ema is not None:
                ema.swap()
            score_layout(forward, lay, tokens, acc, device, cfg.autocast, recorder,
                         fixed_rows=cfg.batch if cfg.compile else None)
            if ema is not None:
                ema.swap()
        score_s.append(time.perf_counter() - t0)
        if c == len(chunks) - 1 or cfg.ttt_epochs == 0 or not params:
            continue
        reserve = (len(chunks) - 1 - c) * float(np.mean(score_s))
        estimate = float(np.mean(train_s)) if train_s else 0.0
        if not budget.allow("ttt_train", estimate, reserve):
            continue
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.ttt_lr, c, len(chunks), cfg.ttt_cosine)
        with budget.phase("ttt_train"):
            steps += sgd_pass(forward, params, opt, tokens, lo, hi, seq_len, cfg.ttt_batch_seqs, cfg.ttt_epochs,
                              cfg.ttt_grad_clip, device, cfg.autocast)
            if ema is not None:
                ema.update()
        train_s.append(time.perf_counter() - t0)
        trained += 1
    return {"chunks": len(chunks), "chunks_trained": trained, "sgd_steps": steps,
            "trainable_params": int(sum(p.numel() for p in params))}
