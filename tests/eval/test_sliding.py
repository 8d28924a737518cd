"""Sliding-window and disjoint-chunk scoring: coverage, exact context, equality with full-context scores."""
import math

import numpy as np
import pytest
import torch
from eval_stand_ins import TinyLM, random_docs, tables

import pgolf
from pgolf.config import resolve
from pgolf.eval.bpb import token_bytes
from pgolf.eval.config import EvalConfig
from pgolf.eval.evaluate import evaluate
from pgolf.eval.sliding import Segments, TokenRecorder, doc_starts, layout, plan_chunks, plan_sliding, segments


def full_nll(model, ids: np.ndarray) -> np.ndarray:
    """NLL of ids[1:] given everything before, in one forward."""
    x = torch.from_numpy(ids[None, :-1])
    y = torch.from_numpy(ids[None, 1:])
    with torch.no_grad():
        return model(x, targets=y, reduction="none")[0].double().numpy()


def nll_with_context(model, tokens: np.ndarray, p: int, a: int) -> float:
    """NLL of target p with context tokens[a:p]."""
    return float(full_nll(model, tokens[a:p + 1])[-1])


def scores(model, tokens, **kw) -> tuple[TokenRecorder, dict]:
    rec = TokenRecorder(len(tokens))
    result = evaluate(model, tokens, tables(), EvalConfig(**kw), recorder=rec)
    return rec, result


@pytest.mark.parametrize("window,stride", [(16, 1), (16, 5), (32, 16), (7, 7), (16, 40)])
def test_plan_scores_every_target_once_with_enough_context(window, stride):
    starts = np.array([0, 30, 31, 100])
    seg = Segments(starts, starts + 1, np.array([30, 31, 100, 173]))
    seg = seg.restrict(3, 170)
    w = plan_sliding(seg, window, stride)
    count = np.zeros(200, dtype=int)
    for a, length, n in zip(w.a, w.length, w.n_score):
        assert 1 <= n <= length <= window
        targets = np.arange(a + length - n + 1, a + length + 1)
        count[targets] += 1
        seg_i = np.searchsorted(seg.start, a, side="right") - 1
        assert a >= seg.start[seg_i]
        ctx = targets - a
        avail = np.minimum(targets - seg.start[seg_i], window)
        assert (ctx >= np.minimum(avail, window - min(stride, window) + 1)).all()
    expected = np.zeros(200, dtype=int)
    for lo, hi in zip(seg.lo, seg.hi):
        expected[lo:hi + 1] = 1
    np.testing.assert_array_equal(count, expected)


def test_segments_end_with_next_bos_and_cover_the_stream():
    tokens = random_docs(5, 3, 9, seed=1)
    seg = segments(tokens, doc_aware=True)
    starts = doc_starts(tokens)
    np.testing.assert_array_equal(seg.start, starts)
    np.testing.assert_array_equal(seg.hi[:-1], starts[1:])
    assert (tokens[seg.hi[:-1]] == pgolf.BOS_ID).all()
    assert int((seg.hi - seg.lo + 1).sum()) == len(tokens) - 1
    plain = segments(tokens, doc_aware=False)
    assert (plain.start[0], plain.lo[0], plain.hi[0]) == (0, 1, len(tokens) - 1)


def test_packing_respects_capacity_and_row_limit():
    tokens = random_docs(40, 2, 12, seed=2)
    w = plan_sliding(segments(tokens, True), 16, 4)
    lay = layout(w, tokens, window=16, batch=3, pack=True, max_per_row=3)
    assert (lay.row_len <= 16).all()
    per_row = np.bincount(lay.row)
    assert per_row.max() <= 3 and per_row.max() >= 2
    end = lay.offset + lay.windows.length
    for r in range(len(lay.row_len)):
        ws = np.flatnonzero(lay.row == r)
        assert (lay.offset[ws][1:] == end[ws][:-1]).all()  # windows laid end to end
        assert all(tokens[lay.windows.a[ws[1:]]] == pgolf.BOS_ID)


def test_sliding_equals_full_context_when_the_stream_fits():
    torch.manual_seed(0)
    model = TinyLM(seq_len=64)
    tokens = random_docs(3, 10, 20)
    assert len(tokens) - 1 <= 64
    ref = full_nll(model, tokens)
    for stride in (1, 8, 64):
        rec, _ = scores(model, tokens, mode="sliding", stride=stride, batch=2)
        np.testing.assert_allclose(rec.nll[1:], ref, rtol=1e-5, atol=1e-5)
    rec, _ = scores(model, tokens, mode="chunks", batch=2)
    np.testing.assert_allclose(rec.nll[1:], ref, rtol=1e-5, atol=1e-5)


def test_doc_aware_equals_per_document_full_context():
    torch.manual_seed(0)
    model = TinyLM(seq_len=32, doc_mask=False)  # isolation must come from the evaluator, not the model
    tokens = random_docs(6, 4, 30, seed=3)
    starts = list(doc_starts(tokens)) + [len(tokens)]
    ref = np.full(len(tokens), np.nan)
    for s, e in zip(starts[:-1], starts[1:]):
        last = min(e, len(tokens) - 1)  # a document's last target is the next BOS
        ref[s + 1:last + 1] = full_nll(model, tokens[s:last + 1])
    for pack in (True, False):
        rec, result = scores(model, tokens, mode="sliding", stride=4, doc_aware=True, pack_docs=pack)
        np.testing.assert_allclose(rec.nll[1:], ref[1:], rtol=1e-5, atol=1e-5)
        assert not result["packed"]  # the model has no doc mask: one document per row


@pytest.mark.parametrize("doc_aware", [False, True])
def test_stride_one_is_the_longest_context_and_larger_strides_stay_in_range(doc_aware):
    torch.manual_seed(1)
    model = TinyLM(seq_len=12)
    tokens = random_docs(3, 15, 30, seed=4)
    starts = doc_starts(tokens) if doc_aware else np.array([0])
    start_of = starts[np.searchsorted(starts, np.arange(len(tokens)) - 1, side="right") - 1]
    rec, _ = scores(model, tokens, mode="sliding", stride=1, doc_aware=doc_aware)
    rec5, _ = scores(model, tokens, mode="sliding", stride=5, doc_aware=doc_aware)
    for p in range(1, len(tokens)):
        s = start_of[p]
        assert rec.nll[p] == pytest.approx(nll_with_context(model, tokens, p, max(s, p - 12)), abs=1e-5)
        allowed = {max(s, p - c) for c in range(12 - 5 + 1, 13)}
        assert any(rec5.nll[p] == pytest.approx(nll_with_context(model, tokens, p, a), abs=1e-5) for a in allowed)


@pytest.mark.parametrize("mode,doc_aware,stride", [("sliding", False, 8), ("sliding", True, 8), ("chunks", False, 64),
                                                   ("chunks", True, 64), ("sliding", True, 3)])
def test_every_target_scored_exactly_once(mode, doc_aware, stride):
    torch.manual_seed(2)
    model = TinyLM(seq_len=24)
    tokens = random_docs(9, 2, 60, seed=5)
    results = []
    for pack in (True, False):
        rec, result = scores(model, tokens, mode=mode, stride=stride, doc_aware=doc_aware, pack_docs=pack, batch=3)
        assert rec.count[0] == 0 and (rec.count[1:] == 1).all()
        assert result["tokens"] == len(tokens) - 1
        results.append(result["val_bpb"])
    assert results[0] == pytest.approx(results[1], rel=1e-6)  # packed rows score like one document per row


def test_bpb_is_total_nll_over_total_bytes():
    torch.manual_seed(3)
    model = TinyLM(seq_len=16)
    tokens = random_docs(4, 5, 25, seed=6)
    rec, result = scores(model, tokens, mode="sliding", stride=4)
    t = torch.from_numpy(tokens)
    nbytes = int(token_bytes(t[:-1], t[1:], tables()).sum())
    assert result["bytes"] == nbytes
    assert result["val_bpb"] == pytest.approx(rec.nll[1:].sum() / math.log(2) / nbytes, rel=1e-9)
    assert result["val_loss"] == pytest.approx(rec.nll[1:].mean(), rel=1e-9)
    assert result["seconds"]["score"] >= 0


def test_chunk_plan_is_disjoint_windows_of_the_training_length():
    seg = segments(np.zeros(50, dtype=np.int64), doc_aware=False)
    w = plan_chunks(seg, 16)
    np.testing.assert_array_equal(w.a, [0, 16, 32, 48])
    np.testing.assert_array_equal(w.length, [16, 16, 16, 1])
    np.testing.assert_array_equal(w.n_score, w.length)


def test_config_from_environment_and_flags():
    cfg = resolve(EvalConfig, env={"MODE": "ttt", "STRIDE": "32", "LORA_TARGETS": "q,v,head"})
    assert (cfg.mode, cfg.stride, cfg.lora_targets) == ("ttt", 32, ("q", "v", "head"))
    with pytest.raises(ValueError, match="mode"):
        EvalConfig(mode="nope")
    with pytest.raises(ValueError, match="window is 0"):
        EvalConfig().resolved_window(None)


def test_cli_evaluates_a_checkpoint_and_an_artifact(tmp_path):
    import dataclasses
    import json

    from pgolf.cli import build_parser
    from pgolf.data.corpus import sample_paths
    from pgolf.data.shards import write_shard
    from pgolf.eval import cli
    from pgolf.model import GPT, ModelConfig
    from pgolf.quant.artifact import export_state_dict
    from pgolf.quant.config import QuantConfig

    cfg = ModelConfig(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=32,
                      loop_count=1, parallel_from_layer=-1)
    torch.manual_seed(0)
    model = GPT(cfg)
    ckpt = tmp_path / "final.pt"
    torch.save({"model_config": dataclasses.asdict(cfg), "model": model.state_dict()}, ckpt)
    artifact = tmp_path / "model.pgq"
    export_state_dict(model.state_dict(), {}, QuantConfig(), {"model_config": dataclasses.asdict(cfg)}, artifact)
    tokens = random_docs(8, 10, 60, vocab=1024)
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    common = ["--val-files", str(tmp_path / "fineweb_val_*.bin"), "--tokenizer-path", str(sample_paths().tokenizer),
              "--device", "cpu", "--stride", "8"]
    for path, kind in ((ckpt, "checkpoint"), (artifact, "artifact")):
        out = tmp_path / f"{kind}.json"
        args = build_parser("eval").parse_args(["eval", str(path), *common, "--out", str(out)])
        assert cli.main(args) == 0
        result = json.loads(out.read_text())
        assert result["kind"] == kind and result["tokens"] == len(tokens) - 1 and result["window"] == 32
        assert 0 < result["val_bpb"] < 20 and "load" in result["seconds"]
        if kind == "checkpoint":
            table_out = tmp_path / "table.json"
            args = build_parser("eval").parse_args(["eval", str(path), *common, "--table", "chunks,sliding:8",
                                                    "--out", str(table_out)])
            assert cli.main(args) == 0
            rows = json.loads(table_out.read_text())
            assert [r["shape"].split(" ")[0] for r in rows] == ["chunks", "sliding:8"]
            assert rows[1]["val_bpb"] == round(result["val_bpb"], 5)  # same mode and stride as the single run
            assert all(r["bench"] == "eval_modes" and abs(r["projected_8gpu_s"] - r["seconds"] / 8) <= 0.01
                       for r in rows)


def test_eval_table_spec_names_bad_modes():
    from pgolf.eval.cli import parse_table

    labels = [(label, c.mode, c.stride) for label, c in parse_table("chunks, sliding:32,ttt", EvalConfig())]
    assert labels == [("chunks", "chunks", 64), ("sliding:32", "sliding", 32), ("ttt", "ttt", 64)]
    with pytest.raises(ValueError, match="unknown mode 'slide'"):
        parse_table("slide:64", EvalConfig())
    with pytest.raises(ValueError, match="positive integer"):
        parse_table("sliding:x", EvalConfig())
