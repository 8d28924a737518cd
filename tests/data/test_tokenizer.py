"""Tokenizer training with the challenge settings, and vocab checks against data."""
import itertools

import numpy as np
import pytest

from pgolf.data.corpus import iter_documents, sample_paths
from pgolf.data.shards import write_shard
from pgolf.data.tokenizer import VocabMismatchError, check_vocab, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    docs = list(itertools.islice(iter_documents(sample_paths().train), 400))
    path = tmp_path_factory.mktemp("tok") / "t_512_bpe.model"
    train_tokenizer(docs, 512, path, num_threads=1)
    return load_tokenizer(path)


@pytest.fixture(params=["trained", "bundled"])
def sp(request, trained):
    return trained if request.param == "trained" else load_tokenizer(sample_paths().tokenizer)


def test_settings(sp):
    assert sp.vocab_size() in (512, 1024)
    assert [sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()] == [0, 1, 2, 3]
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    # byte fallback: the 256 byte pieces follow the specials
    assert all(sp.is_byte(4 + b) and sp.id_to_piece(4 + b) == f"<0x{b:02X}>" for b in range(256))
    # split_digits: every digit is its own piece
    pieces = sp.encode("in 1987654 cases", out_type=str)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1987654")
    # no dummy prefix: a text does not start with the space marker
    assert not sp.encode("Hello", out_type=str)[0].startswith("\u2581")
    # nmt_nfkc normalization (the ligature "fi" becomes "fi"; newlines become spaces)
    assert sp.decode(sp.encode("of\ufb01ce\nwork")) == "office work"
    # an unseen character goes through byte fallback, not <unk>
    ids = sp.encode("\u16a0")  # a runic letter
    assert sp.unk_id() not in ids and all(sp.is_byte(i) for i in ids) and len(ids) == 3
    assert sp.decode(ids) == "\u16a0"


def test_bundled_tokenizer_is_small():
    assert sample_paths().tokenizer.stat().st_size < 400_000


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=".model"):
        train_tokenizer(["a b c"], 512, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b c"], 100, tmp_path / "x.model")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        load_tokenizer(tmp_path / "junk.model")


def test_check_vocab(trained, tmp_path):
    assert check_vocab(trained, 512) == 512
    with pytest.raises(VocabMismatchError, match="vocab 512.*8192"):
        check_vocab(trained, 8192)
    ok = tmp_path / "fineweb_val_000000.bin"
    write_shard(ok, np.arange(512))
    assert check_vocab(trained, ok) == 512
    bad = tmp_path / "fineweb_train_000000.bin"
    write_shard(bad, [1, 5, 900, 7])
    with pytest.raises(VocabMismatchError) as info:
        check_vocab(trained, tmp_path / "fineweb_*.bin")
    assert str(bad) in str(info.value) and "900" in str(info.value)
