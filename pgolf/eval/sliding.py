"""Sliding-window scoring: every target of the stream scored exactly once, with the longest context a window of
the training length gives, in batches; plus the document-aware variant whose context never crosses a BOS.

Vocabulary used throughout pgolf.eval:
- The stream is x[0..N-1]. Target p (1 <= p <= N-1) is the prediction of x[p] from x[<p]; scoring all targets
  counts N-1 tokens in every mode (the official count).
- A window is (a, L, n): inputs x[a:a+L], labels x[a+1:a+L+1]; its last n labels are scored, so a target p in
  it has context x[a:p] of p-a tokens.
- A segment is (start, lo, hi): targets lo..hi whose context may reach back to position `start`. The plain
  stream is one segment (0, 1, N-1). Document-aware, each document (BOS at s, next BOS at e or the end) is a
  segment (s, s+1, e): its targets include the next document's BOS, predicted from this document's context
  (the model's "end of document"), so the count stays N-1 and no context crosses a BOS.
- Windows of a segment are right-aligned: the first one covers targets up to start+window (all with full
  available context), each later one scores the next `stride` targets with a window of exactly `window`
  tokens ending at its last target. Context is therefore >= window-stride+1 tokens, or all there is.

Rows are what the model sees: one window per row, or (document-aware with a model that masks attention at
BOS) several document-start windows packed into one row of `window` tokens. The leak checker
(pgolf.eval.leak) verifies that packing does not leak between documents for a given model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

import pgolf

ROW_ALIGN = 64  # padded row lengths are multiples of this (fewer distinct shapes)

Forward = Callable[..., torch.Tensor]


# ---------------------------------------------------------------- runtime helpers shared by the evaluators

def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_setting(model: torch.nn.Module, *names: str, default=None):
    """A value from the model's config object (`model.config` or `model.cfg`), first name found."""
    for holder in (getattr(model, "config", None), getattr(model, "cfg", None)):
        if holder is None:
            continue
        for name in names:
            value = holder.get(name) if isinstance(holder, dict) else getattr(holder, name, None)
            if value is not None:
                return value
    return default


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def as_tokens(tokens) -> np.ndarray:
    """The validation stream as a 1-D int64 numpy array (accepts numpy, memmaps, torch tensors, lists)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens).reshape(-1)
    if arr.size < 2:
        raise ValueError(f"validation stream needs at least 2 tokens, got {arr.size}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"validation tokens must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class TokenRecorder:
    """Per-target NLL and score counts over the stream (tests and the leak checker; single process)."""

    def __init__(self, n_tokens: int):
        self.nll = np.full(n_tokens, np.nan, dtype=np.float64)
        self.count = np.zeros(n_tokens, dtype=np.int64)

    def add(self, targets: np.ndarray, nll: torch.Tensor) -> None:
        values = nll.detach().double().cpu().numpy()
        np.add.at(self.count, targets, 1)
        self.nll[targets] = values


# ------------------------------------------------------------------------------------- segments and windows

@dataclass
class Segments:
    start: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    def restrict(self, lo: int, hi: int) -> "Segments":
        """Only targets in [lo, hi]; contexts still reach back to each segment's start."""
        new_lo = np.maximum(self.lo, lo)
        new_hi = np.minimum(self.hi, hi)
        keep = new_lo <= new_hi
        return Segments(self.start[keep], new_lo[keep], new_hi[keep])


def doc_starts(tokens: np.ndarray) -> np.ndarray:
    """Start positions of documents: every BOS, and position 0 if the stream does not begin with one."""
    bos = np.flatnonzero(tokens == pgolf.BOS_ID)
    if bos.size == 0 or bos[0] != 0:
        bos = np.concatenate([[0], bos])
    return bos.astype(np.int64)


def segments(tokens: np.ndarray, doc_aware: bool) -> Segments:
    n = len(tokens)
    if not doc_aware:
        return Segments(np.array([0]), np.array([1]), np.array([n - 1]))
    starts = doc_starts(tokens)
    ends = np.append(starts[1:], n - 1)  # last target of each document: the next BOS, or the stream's end
    seg = Segments(starts, starts + 1, ends)
    return seg.restrict(1, n - 1)


@dataclass
class Windows:
    a: np.ndarray
    length: np.ndarray
    n_score: np.ndarray

    def __len__(self) -> int:
        return len(self.a)

    @staticmethod
    def concat(parts: list["Windows"]) -> "Windows":
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return Windows(empty, empty.copy(), empty.copy())
        return Windows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("a", "length", "n_score")))


def plan_sliding(seg: Segments, window: int, stride: int) -> Windows:
    """Right-aligned sliding windows (module docstring); every target of `seg` in exactly one window."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    stride = min(stride, window)
    parts = []
    for start, lo, hi in zip(seg.start.tolist(), seg.lo.tolist(), seg.hi.tolist()):
        first_end = min(hi, max(lo - 1 + stride, start + window))
        k = 1 + -(-(hi - first_end) // stride)
        ends = np.minimum(first_end + stride * np.arange(k, dtype=np.int64), hi)
        prev = np.concatenate([[lo - 1], ends[:-1]])
        a = np.maximum(start, ends - window)
        parts.append(Windows(a, ends - a, ends - prev))
    return Windows.concat(parts)


def plan_chunks(seg: Segments, window: int) -> Windows:
    """Disjoint windows: each segment cut into consecutive pieces of `window` targets, all scored."""
    parts = []
    for lo, hi in zip(seg.lo.tolist(), seg.hi.tolist()):
        a = np.arange(lo - 1, hi, window, dtype=np.int64)
        length = np.minimum(window, hi - a)
        parts.append(Windows(a, length, length.copy()))
    return Windows.concat(parts)


# ------------------------------------------------------------------------------------------ rows and batches

@dataclass
class Layout:
    """Windows placed in rows (`row`, `offset`), windows sorted by row; batches are row ranges."""
    windows: Windows
    row: np.ndarray
    offset: np.ndarray
    row_len: np.ndarray
    batches: list[tuple[int, int, int]]  # (first row, end row, padded row length T)
    window_ptr: np.ndarray  # windows of rows [r0, r1) are window_ptr[r0]:window_ptr[r1]


def _pack_rows(length: np.ndarray, packable: np.ndarray, capacity: int,
               max_per_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy bin packing: the largest packable window opens a row, the smallest ones fill it (at most
    `max_per_row` windows per row, 0 = no limit)."""
    n = len(length)
    row = np.full(n, -1, dtype=np.int64)
    offset = np.zeros(n, dtype=np.int64)
    fixed = np.flatnonzero(~packable)
    row[fixed] = np.arange(len(fixed))
    next_row = len(fixed)
    order = np.flatnonzero(packable)
    order = order[np.argsort(-length[order], kind="stable")].tolist()
    lengths = length.tolist()
    limit = max_per_row if max_per_row > 0 else n + 1
    i, j = 0, len(order) - 1
    while i <= j:
        w = order[i]
        row[w], used, count = next_row, lengths[w], 1
        i += 1
        while i <= j and count < limit and used + lengths[order[j]] <= capacity:
            w = order[j]
            row[w], offset[w] = next_row, used
            used += lengths[w]
            count += 1
            j -= 1
        next_row += 1
    return row, offset


def layout(windows: Windows, tokens: np.ndarray, window: int, batch: int, pack: bool,
           fixed_shape: bool = False, max_per_row: int = 0) -> Layout:
    """Place windows in rows and rows in batches of about `batch` x `window` tokens.

    pack=True puts windows that begin at a BOS together (the model's doc mask must isolate them), at most
    `max_per_row` per row (the model's document slots per row; 0 = no limit); fixed_shape=True pads every
    batch to (batch, window), the one shape torch.compile then sees.
    """
    n = len(windows)
    if pack:
        packable = tokens[windows.a] == pgolf.BOS_ID
        row, offset = _pack_rows(windows.length, packable, window, max_per_row)
    else:
        row, offset = np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    n_rows = int(row.max()) + 1 if n else 0
    row_len = np.zeros(n_rows, dtype=np.int64)
    np.maximum.at(row_len, row, offset + windows.length)
    # rows longest first, so that a batch holds rows of similar length (little padding)
    rank_of_row = np.empty(n_rows, dtype=np.int64)
    rank_of_row[np.argsort(-row_len, kind="stable")] = np.arange(n_rows)
    row = rank_of_row[row]
    row_len = np.sort(row_len)[::-1].copy()
    order = np.lexsort((offset, row))
    windows = Windows(windows.a[order], windows.length[order], windows.n_score[order])
    row, offset = row[order], offset[order]
    window_ptr = np.searchsorted(row, np.arange(n_rows + 1), side="left")

    batches = []
    r = 0
    while r < n_rows:
        if fixed_shape:
            t, rows = window, batch
        else:
            t = min(window, -(-int(row_len[r]) // ROW_ALIGN) * ROW_ALIGN)
            rows = max(1, (batch * window) // t)
        batches.append((r, min(n_rows, r + rows), t))
        r += rows
    return Layout(windows, row, offset, row_len, batches, window_ptr)


@dataclass
class Batch:
    x: torch.Tensor          # (B, T) inputs
    y: torch.Tensor          # (B, T) labels
    score_idx: torch.Tensor  # flat indices into (B*T) of the scored labels
    targets: np.ndarray      # stream positions of those labels


def build_batch(lay: Layout, b: int, tokens: np.ndarray, device: torch.device, rows: int | None = None) -> Batch:
    r0, r1, t = lay.batches[b]
    w0, w1 = int(lay.window_ptr[r0]), int(lay.window_ptr[r1])
    win = lay.windows
    length = win.length[w0:w1]
    rep = np.repeat(np.arange(w1 - w0), length)
    within = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(np.cumsum(length) - length, length)
    src = win.a[w0:w1][rep] + within
    dst = (lay.row[w0:w1] - r0)[rep] * t + lay.offset[w0:w1][rep] + within
    scored = within >= (length - win.n_score[w0:w1])[rep]
    n_rows = rows if rows is not None else r1 - r0
    x = np.zeros(n_rows * t, dtype=np.int64)
    y = np.zeros(n_rows * t, dtype=np.int64)
    x[dst] = tokens[src]
    y[dst] = tokens[src + 1]
    return Batch(torch.from_numpy(x).view(n_rows, t).to(device, non_blocking=True),
                 torch.from_numpy(y).view(n_rows, t).to(device, non_blocking=True),
                 torch.from_numpy(dst[scored]).to(device, non_blocking=True),
                 src[scored] + 1)


def forward_nll(forward: Forward, x: torch.Tensor, y: torch.Tensor, use_autocast: bool) -> torch.Tensor:
    """Per-token NLL (B, T) in float32 through the model contract model(x, targets=y, reduction="none")."""
    with autocast(x.device, use_autocast):
        nll = forward(x, targets=y, reduction="none")
    return nll.float()


def my_batches(lay: Layout) -> Iterator[int]:
    """Batches of this rank: round robin over ranks (batches hold similar work after the length sort)."""
    rank, world = rank_world()
    return iter(range(rank, len(lay.batches), world))


def score_layout(forward: Forward, lay: Layout, tokens: np.ndarray, acc, device: torch.device,
                 use_autocast: bool, recorder: TokenRecorder | None = None, fixed_rows: int | None = None,
                 shard: bool = True) -> int:
    """Score the batches of a layout under no_grad into `acc` (this rank's share, or all of them with
    shard=False); returns the number of targets scored here."""
    done = 0
    with torch.no_grad():
        for b in my_batches(lay) if shard else range(len(lay.batches)):
            batch = build_batch(lay, b, tokens, device, rows=fixed_rows)
            nll = forward_nll(forward, batch.x, batch.y, use_autocast).reshape(-1)[batch.score_idx]
            acc.add(nll, batch.x.reshape(-1)[batch.score_idx], batch.y.reshape(-1)[batch.score_idx])
            if recorder is not None:
                recorder.add(batch.targets, nll)
            done += len(batch.targets)
    return done


def can_pack(model: torch.nn.Module, cfg) -> bool:
    """Packing documents into rows needs the model's doc mask (the leak checker tests that it holds)."""
    return bool(cfg.doc_aware and cfg.pack_docs and model_setting(model, "doc_mask", default=False))


def make_layout(windows: Windows, tokens: np.ndarray, model: torch.nn.Module, cfg, window: int) -> Layout:
    """Rows and batches for `windows` as the config and the model allow (packing, static shapes)."""
    return layout(windows, tokens, window, cfg.batch, pack=can_pack(model, cfg), fixed_shape=cfg.compile,
                  max_per_row=int(model_setting(model, "max_docs_per_row", default=0)))


def sliding_layout(tokens: np.ndarray, model: torch.nn.Module, cfg, window: int, stride: int,
                   seg: Segments | None = None) -> Layout:
    seg = segments(tokens, cfg.doc_aware) if seg is None else seg
    return make_layout(plan_sliding(seg, window, stride), tokens, model, cfg, window)


def run_sliding(forward: Forward, model: torch.nn.Module, tokens: np.ndarray, acc, cfg, window: int,
                budget=None, recorder: TokenRecorder | None = None) -> dict:
    """Mode "sliding": plan, then score this rank's share. Returns mode details for the result dict."""
    device = model_device(model)
    lay = sliding_layout(tokens, model, cfg, window, cfg.stride)
    rows = cfg.batch if cfg.compile else None
    with budget.phase("score") if budget is not None else contextlib.nullcontext():
        score_layout(forward, lay, tokens, acc, device, cfg.autocast, recorder, fixed_rows=rows)
    return {"windows": len(lay.windows), "rows": len(lay.row_len), "batches": len(lay.batches),
            "packed": can_pack(model, cfg)}
