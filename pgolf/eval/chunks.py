"""Disjoint-chunk evaluation (the baseline's val_bpb): consecutive windows of `window` targets, each target
scored once with only the context inside its own chunk (0 .. window-1 tokens). Document-aware, the chunks are
cut per document (pgolf.eval.sliding explains segments and targets)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from pgolf.eval.sliding import Forward, TokenRecorder, make_layout, model_device, plan_chunks, score_layout, segments


def run_chunks(forward: Forward, model: torch.nn.Module, tokens: np.ndarray, acc, cfg, window: int,
               budget=None, recorder: TokenRecorder | None = None) -> dict:
    windows = plan_chunks(segments(tokens, cfg.doc_aware), window)
    lay = make_layout(windows, tokens, model, cfg, window)
    with budget.phase("score") if budget is not None else contextlib.nullcontext():
        score_layout(forward, lay, tokens, acc, model_device(model), cfg.autocast, recorder,
                     fixed_rows=cfg.batch if cfg.compile else None)
    return {"windows": len(lay.windows), "rows": len(lay.row_len), "batches": len(lay.batches)}
