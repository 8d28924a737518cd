"""Text corpus -> tokenizer + contest shards (`pgolf data prepare`).

Input documents:
- JSON Lines (`.jsonl`, `.json`, `.ndjson`): one document per line, its `text` field (other fields ignored).
- Plain text (any other name): with `text_mode="blocks"` (default) a document is a block of lines separated
  by one or more blank lines; with `text_mode="file"` each file is one document.
- Any of these may be compressed: `.xz`, `.zst`, `.gz` (e.g. the shared corpus's `*.jsonl.xz`).
Documents that are empty after stripping whitespace are skipped.

Split: files named as validation (a `val`/`valid`/`validation`/`test` word in the file name, e.g.
`enwiki-val.jsonl.xz`) or passed as `val_input` go to validation; with `val_fraction` > 0 a document of the
other files goes to validation when the sha1 of its text falls below that fraction (identical texts always
land on the same side). A training document whose text also occurs in validation is dropped (counted in the
manifest), so no document is in both splits.

Output (the published layout): `<out>/datasets/fineweb10B_sp<V>/fineweb_{train,val}_NNNNNN.bin`, tokenizer
`<out>/tokenizers/fineweb_<V>_bpe.model`, and `manifest.json` in the dataset folder. Every document starts
with BOS (id 1), no EOS; documents run on across shard boundaries, as in the published shards.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import lzma
import multiprocessing as mp
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from pgolf import BOS_ID
from pgolf.data.shards import PathLike, ShardWriter
from pgolf.data.tokenizer import TRAINER_SETTINGS, load_tokenizer, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".xz", ".zst", ".gz")
_VAL_WORDS = {"val", "valid", "validation", "test"}


@dataclass
class DataConfig:
    input: tuple[str, ...] = field(default=(), metadata={
        "help": "text files, folders or globs (JSONL/plain, optionally .xz/.zst/.gz); default: ../shared/corpus"})
    val_input: tuple[str, ...] = field(default=(), metadata={
        "help": "validation files; default: the input files with val/valid/validation/test in their name"})
    val_fraction: float = field(default=0.0, metadata={
        "help": "also send this fraction of the other documents to validation, chosen by sha1 of the text"})
    out: str = field(default="data", metadata={"help": "output root (datasets/ and tokenizers/ inside)"})
    vocab_size: int = field(default=1024, metadata={"help": "tokenizer vocabulary: 1024, 4096 or 8192"})
    tokenizer: str = field(default="", metadata={"help": "use this SentencePiece .model instead of training one"})
    tokenizer_train_docs: int = field(default=0, metadata={
        "help": "train the tokenizer on the first N training documents (0: all)"})
    input_sentence_size: int = field(default=2_000_000, metadata={
        "help": "SentencePiece keeps a shuffled sample of at most this many paragraphs for training"})
    tokens_per_shard: int = field(default=100_000_000, metadata={"help": "tokens per shard (FineWeb: 1e8)"})
    workers: int = field(default=0, metadata={"help": "tokenizer processes (0: all CPU cores)"})
    batch_docs: int = field(default=256, metadata={"help": "documents per work item"})
    text_mode: str = field(default="blocks", metadata={
        "help": "plain-text files: 'blocks' (blank-line separated documents) or 'file' (one document each)"})
    max_train_docs: int = field(default=0, metadata={"help": "stop after N training documents (0: all)"})
    seed: int = field(default=0, metadata={"help": "tokenizer training seed"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass(frozen=True)
class SamplePaths:
    train: Path
    val: Path
    tokenizer: Path
    vocab_size: int


def sample_paths() -> SamplePaths:
    """The bundled sample of the shared corpus (Text from English Wikipedia, CC BY-SA 3.0) and its sp1024
    tokenizer, trained on the sample's training file with the challenge settings."""
    paths = SamplePaths(train=SAMPLE_DIR / "enwiki-sample-train.jsonl.xz",
                        val=SAMPLE_DIR / "enwiki-sample-val.jsonl.xz",
                        tokenizer=SAMPLE_DIR / "sample_1024_bpe.model", vocab_size=1024)
    for path in (paths.train, paths.val, paths.tokenizer):
        if not path.is_file():
            raise FileNotFoundError(f"bundled sample file missing: {path} (broken install?)")
    return paths


def sample_config(**overrides) -> DataConfig:
    """DataConfig that turns the bundled sample into shards with its bundled sp1024 tokenizer (no training)."""
    paths = sample_paths()
    base = DataConfig(input=(str(paths.train),), val_input=(str(paths.val),), tokenizer=str(paths.tokenizer),
                      vocab_size=paths.vocab_size)
    cfg = dataclasses.replace(base, **overrides)
    if cfg.vocab_size != paths.vocab_size and cfg.tokenizer == base.tokenizer:
        cfg = dataclasses.replace(cfg, tokenizer="")  # another vocabulary: train one on the sample
    return cfg


def shared_corpus_dir() -> Path | None:
    """The workplace's shared corpus, `<repo>/../shared/corpus`, if it is there."""
    for root in (REPO_ROOT, Path.cwd()):
        path = root.parent / "shared" / "corpus"
        if path.is_dir():
            return path
    return None


def _base_name(path: Path) -> str:
    name = path.name
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_text(path: PathLike) -> IO[str]:
    """Open a (possibly .xz/.zst/.gz compressed) UTF-8 text file for reading."""
    path = Path(path)
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(path: PathLike, text_mode: str = "blocks") -> Iterator[str]:
    """Documents of one file (see the module docstring for the formats); empty documents are skipped."""
    path = Path(path)
    if text_mode not in ("blocks", "file"):
        raise ValueError(f"text_mode must be 'blocks' or 'file', got {text_mode!r}")
    with open_text(path) as fh:
        if _base_name(path).endswith(JSON_SUFFIXES):
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON object with a 'text' field ({exc!r})") from None
                if text.strip():
                    yield text
        elif text_mode == "file":
            text = fh.read()
            if text.strip():
                yield text
        else:
            block: list[str] = []
            for line in fh:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    yield "\n".join(block)
                    block = []
            if block:
                yield "\n".join(block)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files named by paths, folders (their files, sorted) or glob patterns; error naming what is missing."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and _base_name(p).endswith(JSON_SUFFIXES + (".txt",)))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"input {item!r}: no such file, or no text files in it")
        files.extend(found)
    return list(dict.fromkeys(files))


def is_val_file(path: Path) -> bool:
    words = re.split(r"[^a-z]+", _base_name(path).lower())
    return any(w in _VAL_WORDS for w in words)


def doc_hash(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


def in_val_fraction(digest: bytes, fraction: float) -> bool:
    return fraction > 0 and int.from_bytes(digest[:8], "big") < fraction * 2**64


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dataset_dir(out: PathLike, vocab_size: int) -> Path:
    return Path(out) / "datasets" / f"fineweb10B_sp{vocab_size}"


def tokenizer_path(out: PathLike, vocab_size: int) -> Path:
    return Path(out) / "tokenizers" / f"fineweb_{vocab_size}_bpe.model"


class _SplitWriter:
    """Writes one split's token stream into fixed-size shards fineweb_<split>_NNNNNN.bin."""

    def __init__(self, folder: Path, split: str, tokens_per_shard: int):
        self.folder, self.split, self.per_shard = folder, split, tokens_per_shard
        self.current: ShardWriter | None = None
        self.shards: list[dict] = []
        self.tokens = 0
        self.docs = 0

    def write(self, tokens: np.ndarray, n_docs: int) -> None:
        self.docs += n_docs
        self.tokens += tokens.size
        while tokens.size:
            if self.current is None:
                name = f"fineweb_{self.split}_{len(self.shards):06d}.bin"
                self.current = ShardWriter(self.folder / name)
            room = self.per_shard - self.current.n_tokens
            self.current.write(tokens[:room])
            tokens = tokens[room:]
            if self.current.n_tokens == self.per_shard:
                self._finish()

    def _finish(self) -> None:
        assert self.current is not None
        n = self.current.close()
        self.shards.append({"file": self.current.path.name, "tokens": n})
        self.current = None

    def close(self) -> None:
        if self.current is not None:
            self._finish()

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()


_WORKER_SP = None


def _worker_init(model_path: str) -> None:
    global _WORKER_SP
    _WORKER_SP = load_tokenizer(model_path)


def _encode_batch(item: tuple[str, list[str]]) -> tuple[str, np.ndarray, int]:
    """Tokenize a batch of documents into one uint16 stream, each document prefixed with BOS."""
    split, texts = item
    encoded = _WORKER_SP.encode(texts, num_threads=1)  # one thread per worker process
    total = sum(len(ids) for ids in encoded) + len(encoded)
    out = np.empty(total, dtype=np.uint16)
    pos = 0
    for ids in encoded:
        out[pos] = BOS_ID
        out[pos + 1:pos + 1 + len(ids)] = ids
        pos += 1 + len(ids)
    return split, out, len(texts)


class _Slots:
    """Bounds the batches in flight between the reader (the pool's task thread) and the writer, and lets the
    writer stop the reader on an error instead of leaving it blocked."""

    def __init__(self, n: int):
        self._sem = threading.Semaphore(n)
        self.stopped = False

    def acquire(self) -> bool:
        self._sem.acquire()
        return not self.stopped

    def release(self) -> None:
        self._sem.release()

    def stop(self) -> None:
        self.stopped = True
        self._sem.release()


def _batches(stream: Iterator[tuple[str, str]], batch_docs: int,
             slots: _Slots | None) -> Iterator[tuple[str, list[str]]]:
    """Group consecutive same-split documents into work items."""
    batch: list[str] = []
    split = None
    for doc_split, text in stream:
        if batch and (doc_split != split or len(batch) >= batch_docs):
            if slots is not None and not slots.acquire():
                return
            yield split, batch
            batch = []
        split = doc_split
        batch.append(text)
    if batch and (slots is None or slots.acquire()):
        yield split, batch


def _resolve_files(cfg: DataConfig) -> tuple[list[Path], list[Path]]:
    inputs = list(cfg.input)
    if not inputs:
        shared = shared_corpus_dir()
        if shared is None:
            raise FileNotFoundError("no --input given and no shared corpus at <repo>/../shared/corpus; "
                                    "use `pgolf data sample` for the bundled sample")
        inputs = [str(shared)]
    files = expand_inputs(inputs)
    if cfg.val_input:
        val_files = expand_inputs(cfg.val_input)
        train_files = [f for f in files if f not in val_files]
    else:
        val_files = [f for f in files if is_val_file(f)]
        train_files = [f for f in files if not is_val_file(f)]
    if not train_files:
        raise ValueError(f"no training files among {[str(f) for f in files]}")
    if not val_files and cfg.val_fraction <= 0:
        raise ValueError("no validation input: name a file with --val-input, include a file with 'val' in its "
                         "name, or set --val-fraction")
    return train_files, val_files


def _train_stream(cfg: DataConfig, train_files: list[Path], val_hashes: set[bytes],
                  stats: dict) -> Iterator[tuple[str, str]]:
    """(split, text) for the documents of the training files, applying the hash split and the dedup."""
    n_train = 0
    for path in train_files:
        for text in iter_documents(path, cfg.text_mode):
            digest = doc_hash(text)
            if in_val_fraction(digest, cfg.val_fraction):
                yield "val", text
                continue
            if digest in val_hashes:
                stats["train_docs_dropped_in_val"] += 1
                continue
            if cfg.max_train_docs and n_train >= cfg.max_train_docs:
                return
            n_train += 1
            yield "train", text


def _obtain_tokenizer(cfg: DataConfig, train_files: list[Path], val_hashes: set[bytes]) -> tuple[Path, float]:
    """Copy the given tokenizer or train one on training documents only; returns its path and seconds."""
    dest = tokenizer_path(cfg.out, cfg.vocab_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if cfg.tokenizer:
        src = Path(cfg.tokenizer)
        vocab = int(load_tokenizer(src).vocab_size())
        if vocab != cfg.vocab_size:
            raise ValueError(f"tokenizer {src} has vocab {vocab} but --vocab-size is {cfg.vocab_size}")
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
            if src.with_suffix(".vocab").is_file():
                shutil.copyfile(src.with_suffix(".vocab"), dest.with_suffix(".vocab"))
        return dest, 0.0
    stream = (text for split, text in _train_stream(cfg, train_files, val_hashes,
                                                     {"train_docs_dropped_in_val": 0}) if split == "train")
    if cfg.tokenizer_train_docs:
        stream = (text for _, text in zip(range(cfg.tokenizer_train_docs), stream))
    train_tokenizer(stream, cfg.vocab_size, dest, input_sentence_size=cfg.input_sentence_size, seed=cfg.seed,
                    num_threads=cfg.workers or os.cpu_count())
    return dest, time.perf_counter() - start


def prepare(cfg: DataConfig) -> dict:
    """Tokenizer + train/val shards + manifest for `cfg`; returns the manifest (also written as JSON)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    train_files, val_files = _resolve_files(cfg)
    val_hashes = {doc_hash(t) for f in val_files for t in iter_documents(f, cfg.text_mode)}
    tok_path, tok_seconds = _obtain_tokenizer(cfg, train_files, val_hashes)
    vocab = int(load_tokenizer(tok_path).vocab_size())

    folder = dataset_dir(cfg.out, vocab)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in list(folder.glob("fineweb_train_*.bin")) + list(folder.glob("fineweb_val_*.bin")):
        stale.unlink()
    writers = {s: _SplitWriter(folder, s, cfg.tokens_per_shard) for s in ("train", "val")}
    stats = {"train_docs_dropped_in_val": 0}

    def stream() -> Iterator[tuple[str, str]]:
        for path in val_files:
            for text in iter_documents(path, cfg.text_mode):
                yield "val", text
        yield from _train_stream(cfg, train_files, val_hashes, stats)

    workers = cfg.workers or os.cpu_count() or 1
    t1 = time.perf_counter()
    bar = tqdm(unit=" docs", desc=f"tokenize sp{vocab}", disable=not cfg.progress, smoothing=0.05)
    pool = None
    try:
        if workers > 1:
            slots = _Slots(4 * workers)
            pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(str(tok_path),))
            results = pool.imap(_encode_batch, _batches(stream(), cfg.batch_docs, slots))
        else:
            slots = None
            _worker_init(str(tok_path))
            results = map(_encode_batch, _batches(stream(), cfg.batch_docs, None))
        for split, tokens, n_docs in results:
            if slots is not None:
                slots.release()
            writers[split].write(tokens, n_docs)
            bar.update(n_docs)
            bar.set_postfix(train=writers["train"].tokens, val=writers["val"].tokens, refresh=False)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            slots.stop()
            pool.terminate()
            pool.join()
    t2 = time.perf_counter()

    manifest = {
        "format": "pgolf-data-manifest-v1",
        "tokenizer": {"path": os.path.relpath(tok_path, folder), "sha256": file_sha256(tok_path),
                      "vocab_size": vocab, "settings": TRAINER_SETTINGS,
                      "trained": not cfg.tokenizer, "source": cfg.tokenizer or None},
        "vocab_size": vocab,
        "bos_id": BOS_ID,
        "splits": {s: {"docs": w.docs, "tokens": w.tokens, "shards": w.shards} for s, w in writers.items()},
        "train_docs_dropped_in_val": stats["train_docs_dropped_in_val"],
        "inputs": [{"path": str(p), "split": "val" if p in val_files else "train", "bytes": p.stat().st_size,
                    "sha256": file_sha256(p)} for p in val_files + train_files],
        "config": dataclasses.asdict(cfg),
        "seconds": {"tokenizer": round(tok_seconds, 2), "tokenize": round(t2 - t1, 2),
                    "total": round(time.perf_counter() - t0, 2)},
        "workers": workers,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
