"""Per-rank training batches from memory-mapped shards, prefetched by a background thread.

The train shards form one token stream (shards in name order, wrapping to the first after the last: one pass
is an epoch). A batch row is a window of seq_len + 1 tokens: inputs are the first seq_len, targets the last
seq_len. Consecutive rows overlap by exactly one token (stride seq_len), so every token of the stream is an
input exactly once and a target exactly once per epoch -- none repeated, none skipped.

A global step consists of world_size * batch_size rows; rank r takes rows [r*B, (r+1)*B) of it, i.e. span r
of the global batch. Stacking the ranks' rows therefore gives exactly the rows that world_size 1 with batch
world_size * B would see, whatever the world size.

Options:
- `packing=True` (document-aligned): each row starts at the first BOS within `bos_window` tokens after the
  end of the previous row, where there is one (else it continues contiguously). The tokens jumped over -- the
  tail of a document that did not fit the previous row -- are skipped by design.
- `sampler="coprime"`: rows are the N = (tokens - 1) // seq_len stride-seq_len windows of the whole stream,
  visited in the order (offset + k * stride) mod N with stride coprime to N, drawn per epoch from `seed`:
  a permutation of all rows across all shards, so still no repeat or skip within an epoch.

`state_dict()` is the position after the last batch handed out (not after what the prefetcher read ahead), so
a run resumed with `load_state_dict()` gets the very batches the original run would have got next.
"""
from __future__ import annotations

import bisect
import math
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from pgolf import BOS_ID
from pgolf.data.shards import PathLike, list_shards, read_shard

class TokenLoader:
    """Batches (inputs, targets) of int64 shape (batch_size, seq_len) for one rank; see the module docstring."""

    def __init__(self, pattern: PathLike, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None, packing: bool = False, bos_window: int | None = None,
                 sampler: str = "sequential", seed: int = 0, prefetch: int = 2,
                 device: torch.device | str | None = None, pin_memory: bool | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if sampler not in ("sequential", "coprime"):
            raise ValueError(f"sampler must be 'sequential' or 'coprime', got {sampler!r}")
        if packing and sampler != "sequential":
            raise ValueError("packing works with the sequential sampler only")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.packing, self.bos_window = packing, bos_window or seq_len
        self.sampler, self.seed = sampler, seed
        self.device = torch.device(device) if device is not None else None
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.paths = list_shards(pattern)
        tokens = [read_shard(p, vocab_size) for p in self.paths]
        self._shards = [t for t in tokens if len(t)]
        self._counts = [len(t) for t in tokens]
        self._starts = np.cumsum([0] + [len(t) for t in self._shards]).tolist()
        self.total_tokens = self._starts[-1]
        if self.total_tokens < seq_len + 1:
            raise ValueError(f"{pattern}: {self.total_tokens} tokens, fewer than one row of {seq_len + 1}")
        self._rows_per_epoch = (self.total_tokens - 1) // seq_len
        self._perm_cache: dict[int, tuple[int, int]] = {}
        self._cursor = 0
        self._steps = 0
        self._prefetch = max(1, prefetch)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- the token stream -------------------------------------------------------------------------------
    def _read(self, pos: int, length: int) -> np.ndarray:
        """`length` tokens of the stream from absolute position `pos`, wrapping across shards and epochs."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            p = pos % self.total_tokens
            i = bisect.bisect_right(self._starts, p) - 1
            off = p - self._starts[i]
            take = min(length - filled, len(self._shards[i]) - off)
            out[filled:filled + take] = self._shards[i][off:off + take]
            filled += take
            pos += take
        return out

    def _permutation(self, epoch: int) -> tuple[int, int]:
        if epoch not in self._perm_cache:
            n = self._rows_per_epoch
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(n))
            stride = int(rng.integers(max(1, n // 3), max(2, (2 * n) // 3 + 1)))
            while math.gcd(stride, n) != 1:
                stride += 1
            self._perm_cache = {epoch: (offset, stride)}
        return self._perm_cache[epoch]

    def _batch_at(self, cursor: int) -> tuple[np.ndarray, int]:
        """Rows (B, T+1) of this rank for the global step starting at `cursor`, and the next cursor."""
        B, T, W, r = self.batch_size, self.seq_len, self.world_size, self.rank
        if self.sampler == "coprime":
            rows = np.empty((B, T + 1), dtype=np.int64)
            for i in range(B):
                epoch, k = divmod(cursor + r * B + i, self._rows_per_epoch)
                offset, stride = self._permutation(epoch)
                rows[i] = self._read(((offset + k * stride) % self._rows_per_epoch) * T, T + 1)
            return rows, cursor + W * B
        if not self.packing:
            span = self._read(cursor + r * B * T, B * T + 1)
            rows = np.lib.stride_tricks.as_strided(span, shape=(B, T + 1), strides=(T * 8, 8))
            return rows, cursor + W * B * T
        rows = np.empty((B, T + 1), dtype=np.int64)
        c = cursor
        for i in range(W * B):
            hits = np.flatnonzero(self._read(c, self.bos_window) == BOS_ID)
            start = c + int(hits[0]) if hits.size else c
            if r * B <= i < (r + 1) * B:
                rows[i - r * B] = self._read(start, T + 1)
            c = start + T
        return rows, c

    # ---- prefetching ------------------------------------------------------------------------------------
    def _to_tensors(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    @staticmethod
    def _put(q: queue.Queue, item: object, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _produce(self, cursor: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                rows, cursor = self._batch_at(cursor)
                self._put(q, (*self._to_tensors(rows), cursor), stop)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(q, exc, stop)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._cursor, self._queue, self._stop),
                                        name=f"TokenLoader-rank{self.rank}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the prefetch thread (the loader can go on afterwards; it restarts on the next batch)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._queue = None, None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets), int64 (batch_size, seq_len), on `device` if one was given."""
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        x, y, self._cursor = item
        self._steps += 1
        if self.device is not None:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def __enter__(self) -> "TokenLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- resuming ---------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        unit = self._rows_per_epoch if self.sampler == "coprime" else self.total_tokens
        return self._cursor // unit

    def state_dict(self) -> dict:
        return {"cursor": self._cursor, "steps": self._steps, "sampler": self.sampler, "packing": self.packing,
                "seed": self.seed, "seq_len": self.seq_len,
                "shards": [[Path(p).name, n] for p, n in zip(self.paths, self._counts)]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the shards (names and token counts) must be the same as when it was saved.

        The sequential stream position is in tokens, so batch size and world size may change on resume; the
        coprime sampler counts rows of seq_len, so seq_len must stay.
        """
        shards = [[Path(p).name, n] for p, n in zip(self.paths, self._counts)]
        if [list(s) for s in state["shards"]] != shards:
            raise ValueError(f"loader state is for shards {state['shards']}, but this loader reads {shards}")
        for key in ("sampler", "packing", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {getattr(self, key)!r}")
        if self.sampler == "coprime" and state["seq_len"] != self.seq_len:
            raise ValueError(f"coprime sampler state is for seq_len {state['seq_len']}, not {self.seq_len}")
        self.close()
        self._cursor, self._steps = int(state["cursor"]), int(state["steps"])


def load_validation_tokens(pattern: PathLike, vocab_size: int | None = None,
                           seq_len: int | None = None) -> np.ndarray:
    """All validation shards concatenated (uint16), ids checked against `vocab_size`.

    With `seq_len`, trimmed as the records do to k * seq_len + 1 tokens, k = (n - 1) // seq_len: k disjoint
    windows of seq_len inputs, the one extra token being the last window's final target. (The records'
    sliding-window evaluation works from the same trimmed stream.)
    """
    parts = [read_shard(p, vocab_size) for p in list_shards(pattern)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    if seq_len is not None:
        k = (len(tokens) - 1) // seq_len
        if k < 1:
            raise ValueError(f"{pattern}: {len(tokens)} validation tokens, fewer than one window of {seq_len}+1")
        tokens = tokens[: k * seq_len + 1]
    return tokens
