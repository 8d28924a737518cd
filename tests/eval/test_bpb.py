"""Exact val_bpb: byte tables by hand, a hand-computed bpb, cross-rank reduction, and the byte count of the
shared corpus's whole validation split equal to the UTF-8 bytes of its decoded text."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp

from pgolf import BOS_ID
from pgolf.data.corpus import iter_documents, sample_paths
from pgolf.data.tokenizer import load_tokenizer
from pgolf.eval.bpb import BpbAccumulator, bits_per_byte, build_byte_tables, token_bytes

SHARED_VAL = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "enwiki-val.jsonl.xz"


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(sample_paths().tokenizer)


@pytest.fixture(scope="module")
def tables(sp):
    return build_byte_tables(sp)


def test_tables(sp, tables):
    assert tables.vocab_size == sp.vocab_size()
    for i in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert tables.is_boundary[i] and tables.base_bytes[i] == 0 and not tables.has_leading_space[i]
    for b in (0x00, 0x41, 0xC3, 0xFF):
        i = sp.piece_to_id(f"<0x{b:02X}>")
        assert tables.base_bytes[i] == 1 and not tables.is_boundary[i] and not tables.has_leading_space[i]
    the = sp.piece_to_id("\u2581the")
    assert tables.base_bytes[the] == 3 and tables.has_leading_space[the]
    space = sp.piece_to_id("\u2581")
    assert tables.base_bytes[space] == 0 and tables.has_leading_space[space]
    multi = next(i for i in range(sp.vocab_size()) if sp.id_to_piece(i) == "é")
    assert tables.base_bytes[multi] == 2
    padded = build_byte_tables(sp, vocab_size=sp.vocab_size() + 5)
    assert padded.vocab_size == sp.vocab_size() + 5 and padded.is_boundary[-5:].all()
    assert padded.base_bytes[-5:].sum() == 0


def test_hand_built_bpb(sp, tables):
    the, ing, e2 = sp.piece_to_id("\u2581the"), sp.piece_to_id("ing"), sp.piece_to_id("<0xE2>")
    assert sp.id_to_piece(ing) == "ing"
    seq = torch.tensor([BOS_ID, the, ing, the, e2, BOS_ID, the])
    prev, tgt = seq[:-1], seq[1:]
    # BOS->"▁the" 3 (no space after BOS), "▁the"->"ing" 3, "ing"->"▁the" 3+1, "▁the"-><0xE2> 1,
    # <0xE2>->BOS 0, BOS->"▁the" 3
    expect = [3, 3, 4, 1, 0, 3]
    assert token_bytes(prev, tgt, tables).tolist() == expect
    nll = torch.tensor([0.5, 1.0, 2.0, 0.25, 3.0, 0.75])
    acc = BpbAccumulator(tables)
    acc.add(nll[:4].reshape(2, 2), prev[:4].reshape(2, 2), tgt[:4].reshape(2, 2))
    acc.add(nll[4:], prev[4:], tgt[4:])
    assert acc.nll_sum == 7.5 and acc.byte_sum == 14 and acc.token_count == 6
    assert acc.bpb() == pytest.approx(7.5 / math.log(2) / 14, rel=1e-15)
    assert acc.loss() == pytest.approx(7.5 / 6, rel=1e-15)
    assert bits_per_byte(7.5, 14) == acc.bpb()
    acc.all_reduce()  # not distributed: unchanged
    assert acc.byte_sum == 14
    with pytest.raises(ValueError, match="no bytes"):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        acc.add(nll, prev[:3], tgt)


def test_float64_accumulation(tables):
    acc = BpbAccumulator(tables)
    nll = torch.full((1000,), 0.1, dtype=torch.bfloat16)
    ids = torch.full((1000,), 300)
    for _ in range(100):
        acc.add(nll, ids, ids)
    assert acc.sums.dtype == torch.float64
    assert acc.nll_sum == pytest.approx(100 * 1000 * float(torch.tensor(0.1, dtype=torch.bfloat16)), rel=1e-12)


def _reduce_worker(rank, world, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sp = load_tokenizer(sample_paths().tokenizer)
    acc = BpbAccumulator(build_byte_tables(sp))
    ids = torch.tensor([BOS_ID, sp.piece_to_id("\u2581the"), sp.piece_to_id("ing")])
    acc.add(torch.tensor([1.0, 2.0]) * (rank + 1), ids[:-1], ids[1:])
    acc.all_reduce()
    results[rank] = (acc.nll_sum, acc.byte_sum, acc.token_count)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_two_processes(tmp_path):
    with tmp.Manager() as manager:
        results = manager.dict()
        tmp.spawn(_reduce_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
        got = dict(results)
    assert got[0] == got[1] == (9.0, 12.0, 4)  # nll 3 + 6, bytes 2 * (3 + 3), tokens 2 * 2


@pytest.mark.skipif(not SHARED_VAL.is_file(), reason="no shared corpus at <repo>/../shared/corpus")
def test_bytes_of_shared_val_split(sp, tables):
    """All 4,554 documents of enwiki-val (16.5 MB; a few seconds): the table-counted bytes of the BOS-prefixed
    token stream equal the UTF-8 bytes of the decoded text, and decoding round-trips (decode gives exactly the
    normalized text, which re-encodes to the same ids)."""
    docs = list(iter_documents(SHARED_VAL))
    assert len(docs) == 4554
    encoded = sp.encode(docs)
    stream = torch.from_numpy(np.concatenate([np.r_[BOS_ID, ids] for ids in encoded]).astype(np.int64))
    counted = int(token_bytes(stream[:-1], stream[1:], tables).to(torch.int64).sum())  # stream[0] is BOS: 0
    decoded = sp.decode(encoded)
    assert counted == sum(len(text.encode("utf-8")) for text in decoded)
    assert int((stream == sp.unk_id()).sum()) == 0
    assert sum(sp.is_byte(int(i)) for i in stream.unique()) > 0  # byte fallback is exercised
    for text, out in zip(docs, decoded):
        assert out == sp.normalize(text).replace("\u2581", " ")
    assert sp.encode(decoded) == encoded
