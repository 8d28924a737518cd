"""SentencePiece BPE tokenizers with the challenge's exact settings.

The settings (CHALLENGE.md): model_type=bpe, byte_fallback=True, split_digits=True, nmt_nfkc normalization,
add_dummy_prefix=False, character_coverage=0.999, ids pad 0 / bos 1 / eos 2 / unk 3. Normalization maps
newlines to spaces, collapses runs of whitespace and strips the ends of each encoded text, so a decoded
document is the normalized text; val_bpb counts the bytes of that normalized text (pgolf.eval.bpb).

Training text goes to SentencePiece one paragraph (line) per "sentence": pieces never cross whitespace
(split_by_whitespace), so this loses no merge, and it keeps each sentence well under SentencePiece's
max_sentence_length (whole articles often exceed it and would be dropped silently). `input_sentence_size`
caps what the trainer keeps (a shuffled reservoir sample), which bounds its time and memory.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from pgolf import BOS_ID
from pgolf.data.shards import PathLike, ShardError, list_shards, read_shard

TRAINER_SETTINGS: dict = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "character_coverage": 0.999,
    "pad_id": 0,
    "bos_id": BOS_ID,
    "eos_id": 2,
    "unk_id": 3,
}
MAX_SENTENCE_BYTES = 16384


class VocabMismatchError(ValueError):
    """Tokenizer and data (or model) disagree on the vocabulary."""


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.replace("\x00", " ").split("\n"):
            line = line.strip()
            if line:
                yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: PathLike, *,
                    input_sentence_size: int = 2_000_000, seed: int = 0, num_threads: int | None = None,
                    quiet: bool = True) -> Path:
    """Train a BPE tokenizer on `texts` (documents) and write `model_path` (+ `.vocab` next to it).

    `vocab_size` should be one of 1024/4096/8192 for contest compatibility (others are allowed). The
    vocabulary limit is hard: a corpus too small to reach it is an error rather than a silently smaller
    tokenizer whose shards would not fit a model sized for `vocab_size`.
    """
    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"tokenizer path must end in .model: {model_path}")
    if not 260 < vocab_size <= 65536:
        raise ValueError(f"vocab_size {vocab_size} must exceed 4 special + 256 byte pieces and fit uint16")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # SentencePiece writes <prefix>.model/.vocab; train under a temporary prefix so a failed or interrupted
    # run never leaves a half-written tokenizer under the final name.
    spm.set_random_generator_seed(seed)  # the shuffle of the input_sentence_size sample
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        prefix = Path(tmp) / "sp"
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2 if quiet else 0,
            **TRAINER_SETTINGS,
        )
        os.replace(prefix.with_suffix(".model"), model_path)
        os.replace(prefix.with_suffix(".vocab"), model_path.with_suffix(".vocab"))
    return model_path


def load_tokenizer(path: PathLike) -> spm.SentencePieceProcessor:
    """Load a SentencePiece `.model`; clear errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a SentencePiece model ({exc})") from exc
    return sp


def _as_processor(tokenizer: spm.SentencePieceProcessor | PathLike) -> spm.SentencePieceProcessor:
    return tokenizer if isinstance(tokenizer, spm.SentencePieceProcessor) else load_tokenizer(tokenizer)


def check_vocab(tokenizer: spm.SentencePieceProcessor | PathLike, shard_path_or_vocab: int | PathLike) -> int:
    """Check that data fits a tokenizer; returns the tokenizer's vocab size.

    `shard_path_or_vocab` is a vocabulary size (of a model or dataset), a shard path, or a glob of shards.
    Raises VocabMismatchError naming both sides when a vocab size differs or a shard holds an id >= the
    tokenizer's vocab (the classic sign of sp8192 shards paired with an sp1024 tokenizer).
    """
    sp = _as_processor(tokenizer)
    vocab = int(sp.vocab_size())
    if isinstance(shard_path_or_vocab, int):
        if shard_path_or_vocab != vocab:
            raise VocabMismatchError(f"tokenizer has vocab {vocab} but the data/model expects vocab "
                                     f"{shard_path_or_vocab}")
        return vocab
    for path in list_shards(shard_path_or_vocab):
        try:
            read_shard(path, vocab_size=vocab)
        except ShardError as exc:
            if exc.kind != "vocab":
                raise
            raise VocabMismatchError(f"{path} does not fit the tokenizer (vocab {vocab}): {exc.problem}") from exc
    return vocab
