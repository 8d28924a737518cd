"""The contest's token shard format, read and written byte-exactly.

A shard is a header of 256 little-endian int32 words -- [0] = 20240520 (magic), [1] = 1 (version),
[2] = n (number of tokens), the rest zero -- followed by n little-endian uint16 token ids. Its size is
exactly 1024 + 2 * n bytes. Published FineWeb shards and the ones `pgolf data prepare` writes are
interchangeable.

Reading memory-maps the tokens; validating ids against a vocabulary scans the map in chunks so that a
1e8-token shard never lands in RAM as a whole.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKENS = 2**31 - 1
_CHECK_CHUNK = 1 << 24  # tokens per chunk when scanning ids (32 MiB)

PathLike = str | os.PathLike


class ShardError(ValueError):
    """A shard file that does not follow the format; the message names the file and the problem."""

    def __init__(self, path: PathLike, problem: str, kind: str = "format"):
        self.path = str(path)
        self.problem = problem
        self.kind = kind  # one of: missing, magic, version, truncated, size, vocab, format
        super().__init__(f"{path}: {problem}")


def _header(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n_tokens
    return header.tobytes()


def _as_tokens(tokens: Iterable[int] | np.ndarray, path: PathLike) -> np.ndarray:
    arr = np.asarray(tokens).reshape(-1)
    if arr.dtype != TOKEN_DTYPE:
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
            raise ShardError(path, f"token ids must lie in [0, 65535], got [{arr.min()}, {arr.max()}]")
        arr = arr.astype(TOKEN_DTYPE)
    return arr


class ShardWriter:
    """Stream tokens into a shard of unknown final length without holding it in memory.

    The header is written with a zero count first and patched on `close()`; until then the file sits under
    a temporary name, so a reader never sees a half-written shard under the final name.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._fh = open(self._tmp, "wb")
        self._fh.write(_header(0))
        self.n_tokens = 0

    def write(self, tokens: Iterable[int] | np.ndarray) -> None:
        arr = _as_tokens(tokens, self.path)
        if self.n_tokens + arr.size > MAX_TOKENS:
            raise ShardError(self.path, "more tokens than the int32 count of the header can hold")
        self._fh.write(arr.tobytes())
        self.n_tokens += int(arr.size)

    def close(self) -> int:
        """Patch the count into the header and move the file to its final name; returns the token count."""
        self._fh.seek(0)
        self._fh.write(_header(self.n_tokens))
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.n_tokens

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def write_shard(path: PathLike, tokens: Iterable[int] | np.ndarray) -> int:
    """Write `tokens` (ids in [0, 65535]) as one shard, atomically; returns the number of tokens."""
    writer = ShardWriter(path)
    try:
        writer.write(tokens)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def shard_token_count(path: PathLike) -> int:
    """Validate the header and the exact file size; return the number of tokens."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(path, "no such file", "missing") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(path, f"truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header",
                         "truncated")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != MAGIC:
        raise ShardError(path, f"wrong magic {int(header[0])} (expected {MAGIC}); not a token shard", "magic")
    if int(header[1]) != VERSION:
        raise ShardError(path, f"unsupported version {int(header[1])} (expected {VERSION})", "version")
    n = int(header[2])
    if n < 0:
        raise ShardError(path, f"negative token count {n} in the header")
    expected = HEADER_BYTES + 2 * n
    if size < expected:
        raise ShardError(path, f"truncated: header says {n} tokens ({expected} bytes) but the file has {size} bytes",
                         "truncated")
    if size != expected:
        raise ShardError(path, f"size mismatch: header says {n} tokens ({expected} bytes) but the file has "
                               f"{size} bytes", "size")
    return n


def read_shard(path: PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a shard's tokens as a read-only uint16 array, after validating header and size.

    With `vocab_size`, every id is checked to be < vocab_size (chunk by chunk); the first offending id and
    its position are reported.
    """
    n = shard_token_count(path)
    if n == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))
    if vocab_size is not None:
        check_ids(tokens, vocab_size, path)
    return tokens


def check_ids(tokens: np.ndarray, vocab_size: int, path: PathLike) -> None:
    """Raise ShardError if any id is >= vocab_size; scans in chunks to bound memory."""
    for start in range(0, len(tokens), _CHECK_CHUNK):
        chunk = tokens[start:start + _CHECK_CHUNK]
        top = int(chunk.max())
        if top >= vocab_size:
            where = start + int(np.argmax(chunk >= vocab_size))
            raise ShardError(path, f"token id {int(tokens[where])} at position {where} is >= vocab size "
                                   f"{vocab_size} (largest id in the shard's chunk: {top}); the data was made "
                                   f"with a larger vocabulary than the tokenizer/model expects", "vocab")


def list_shards(pattern: PathLike) -> list[Path]:
    """Sorted paths matching a glob pattern; FileNotFoundError when nothing matches."""
    paths = sorted(Path(p) for p in glob.glob(str(pattern)))
    if not paths:
        raise FileNotFoundError(f"no shard matches {pattern!s}; prepare data with `pgolf data prepare` or "
                                f"`pgolf data sample`, or download it with `pgolf data download`")
    return paths
