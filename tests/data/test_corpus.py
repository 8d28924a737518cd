"""Corpus reading and `prepare` end to end on tiny inputs: shards, BOS, manifest, splits that never mix."""
import gzip
import itertools
import json
import lzma
import re

import numpy as np
import pytest
import zstandard

from pgolf import BOS_ID
from pgolf.cli import main as pgolf_main
from pgolf.data.corpus import (DataConfig, dataset_dir, expand_inputs, is_val_file, iter_documents, prepare,
                               sample_paths, tokenizer_path)
from pgolf.data.shards import list_shards, read_shard
from pgolf.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def docs():
    return list(itertools.islice(iter_documents(sample_paths().train), 300))


def _jsonl(docs):
    return "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)).encode()


def _split_docs(folder, split):
    """Documents of a split as token arrays (split at BOS), checking the stream starts with BOS."""
    stream = np.concatenate([read_shard(p) for p in list_shards(folder / f"fineweb_{split}_*.bin")])
    assert stream[0] == BOS_ID
    starts = np.flatnonzero(stream == BOS_ID)
    return [stream[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [len(stream)])]


@pytest.mark.parametrize("suffix, compress", [
    ("", lambda b: b), (".xz", lzma.compress), (".gz", gzip.compress),
    (".zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_iter_documents_formats(tmp_path, suffix, compress):
    texts = ["first doc\nwith two lines", "second ünïcode doc", "third"]
    (tmp_path / f"a.jsonl{suffix}").write_bytes(compress(_jsonl(texts) + b"\n"))
    assert list(iter_documents(tmp_path / f"a.jsonl{suffix}")) == texts
    plain = "\n\n\n".join(texts) + "\n\n  \n"
    (tmp_path / f"b.txt{suffix}").write_bytes(compress(plain.encode()))
    assert list(iter_documents(tmp_path / f"b.txt{suffix}")) == texts
    assert list(iter_documents(tmp_path / f"b.txt{suffix}", text_mode="file")) == [plain]


def test_bad_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        list(iter_documents(tmp_path / "bad.jsonl"))


def test_inputs_and_val_names(tmp_path):
    for name in ("enwiki-train-000.jsonl.xz", "enwiki-val.jsonl.xz", "notes.md"):
        (tmp_path / name).write_bytes(b"")
    files = expand_inputs([str(tmp_path)])
    assert [f.name for f in files] == ["enwiki-train-000.jsonl.xz", "enwiki-val.jsonl.xz"]
    assert [is_val_file(f) for f in files] == [False, True]
    assert not is_val_file(tmp_path / "interval.txt")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_inputs([str(tmp_path / "nothing-here*")])


def test_prepare_end_to_end(tmp_path, docs):
    train, val = docs[:250], docs[250:]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "wiki-train.jsonl.gz").write_bytes(gzip.compress(_jsonl(train + val[:3])))  # 3 dupes
    (tmp_path / "in" / "wiki-val.jsonl.xz").write_bytes(lzma.compress(_jsonl(val)))
    out = tmp_path / "out"
    cfg = DataConfig(input=(str(tmp_path / "in"),), out=str(out), vocab_size=512, tokens_per_shard=40_000,
                     workers=2, batch_docs=16, progress=False)
    manifest = prepare(cfg)

    folder = dataset_dir(out, 512)
    assert folder.name == "fineweb10B_sp512" and tokenizer_path(out, 512).is_file()
    sp = load_tokenizer(tokenizer_path(out, 512))
    assert sp.vocab_size() == 512
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["train_docs_dropped_in_val"] == 3
    assert {i["split"] for i in manifest["inputs"]} == {"train", "val"}
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    for split, texts in (("train", train), ("val", val)):
        info = manifest["splits"][split]
        shards = list_shards(folder / f"fineweb_{split}_*.bin")
        assert [s.name for s in shards] == [s["file"] for s in info["shards"]]
        assert [f"fineweb_{split}_{i:06d}.bin" for i in range(len(shards))] == [s.name for s in shards]
        sizes = [len(read_shard(s, 512)) for s in shards]
        assert sizes[:-1] == [40_000] * (len(sizes) - 1) and sum(sizes) == info["tokens"]
        got = _split_docs(folder, split)
        assert info["docs"] == len(got) == len(texts)
        # every document is BOS + its tokens, in input order
        for ids, text in zip(got, texts):
            assert ids.tolist() == sp.encode(text)
    assert len(list_shards(folder / "fineweb_train_*.bin")) > 1

    # one process gives byte-identical shards (order is deterministic), reusing the tokenizer
    out1 = tmp_path / "out1"
    prepare(DataConfig(input=cfg.input, out=str(out1), vocab_size=512, tokens_per_shard=40_000, workers=1,
                       tokenizer=str(tokenizer_path(out, 512)), progress=False))
    for path in folder.glob("*.bin"):
        assert (dataset_dir(out1, 512) / path.name).read_bytes() == path.read_bytes()


def test_hash_split_never_mixes(tmp_path, docs):
    texts = docs[:120] + docs[:30]  # 30 duplicated documents
    (tmp_path / "corpus.txt").write_text("\n\n".join(re.sub(r"\n\s*\n", "\n", t) for t in texts))
    out = tmp_path / "out"
    manifest = prepare(DataConfig(input=(str(tmp_path / "corpus.txt"),), val_fraction=0.25, out=str(out),
                                  vocab_size=1024, tokenizer=str(sample_paths().tokenizer), workers=1,
                                  progress=False))
    folder = dataset_dir(out, 1024)
    train = {tuple(d.tolist()) for d in _split_docs(folder, "train")}
    val = {tuple(d.tolist()) for d in _split_docs(folder, "val")}
    assert not train & val
    n_val = manifest["splits"]["val"]["docs"]
    assert manifest["splits"]["train"]["docs"] + n_val == len(texts)
    assert 10 <= n_val <= 70


def test_bad_input_stops_the_workers(tmp_path):
    (tmp_path / "x-val.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "x-train.jsonl").write_text('{"text": "fine"}\n' * 50 + "{oops\n" + '{"text": "more"}\n' * 50)
    with pytest.raises(ValueError, match=r"x-train.jsonl:51"):
        prepare(DataConfig(input=(str(tmp_path),), out=str(tmp_path / "o"), tokenizer=str(sample_paths().tokenizer),
                           workers=2, batch_docs=4, progress=False))
    assert not list((tmp_path / "o").rglob("*.tmp"))


def test_prepare_needs_validation(tmp_path):
    (tmp_path / "corpus.txt").write_text("a document")
    with pytest.raises(ValueError, match="no validation input"):
        prepare(DataConfig(input=(str(tmp_path / "corpus.txt"),), out=str(tmp_path), progress=False))


def test_tokenizer_vocab_must_match(tmp_path):
    (tmp_path / "a-train.txt").write_text("a document")
    (tmp_path / "a-val.txt").write_text("another")
    with pytest.raises(ValueError, match="vocab 1024 but --vocab-size is 8192"):
        prepare(DataConfig(input=(str(tmp_path),), out=str(tmp_path / "o"), vocab_size=8192,
                           tokenizer=str(sample_paths().tokenizer), progress=False))


def test_sample_command(tmp_path, capsys):
    paths = sample_paths()
    readme = (paths.train.parent / "README.md").read_text()
    assert "Text from English Wikipedia, CC BY-SA 3.0" in readme
    assert paths.train.stat().st_size < 4_000_000
    with pytest.raises(SystemExit) as info:
        pgolf_main(["data", "sample", "--out", str(tmp_path), "--workers", "1", "--progress", "0"])
    assert info.value.code == 0
    assert "train: 2,700 docs" in capsys.readouterr().out
    val = read_shard(dataset_dir(tmp_path, 1024) / "fineweb_val_000000.bin", vocab_size=1024)
    assert val[0] == BOS_ID and (val == BOS_ID).sum() == 150
