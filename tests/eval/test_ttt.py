"""Score-first TTT and phased LoRA TTT: they learn, they leave the model alone, the budget gates them, and the
distributed split gives the single-process result."""
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from eval_stand_ins import TinyLM, pattern_docs, random_docs, repeated_docs, tables, tiny_gpt

from pgolf.eval.budget import EvalBudget
from pgolf.eval.config import EvalConfig
from pgolf.eval.evaluate import evaluate
from pgolf.eval.lora_ttt import phase_bounds, phase_groups
from pgolf.eval.sliding import TokenRecorder, doc_starts
from pgolf.eval.ttt import chunk_ranges, select_params

TTT = dict(mode="ttt", stride=4, ttt_chunk_tokens=80, ttt_epochs=2, ttt_lr=0.3, ttt_batch_seqs=8)
LORA = dict(mode="lora_ttt", stride=4, phases=0, lora_lr=0.03, lora_rank=4, lora_alpha=8, lora_chunk=8,
            lora_batch_docs=3)


def bpb(model, tokens, **kw) -> dict:
    return evaluate(model, tokens, tables(), EvalConfig(**kw))


def test_score_first_ttt_learns_a_repeated_text_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = TinyLM(seq_len=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = repeated_docs(8, 80)  # each repeat lies beyond the 16-token window: only weights can learn it
    base = bpb(model, tokens, mode="sliding", stride=4)
    result = bpb(model, tokens, **TTT)
    assert result["val_bpb"] < 0.6 * base["val_bpb"]
    assert result["tokens"] == len(tokens) - 1
    assert result["chunks_trained"] == result["chunks"] - 1 == 7
    assert result["sgd_steps"] == 7 * 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    frozen_all = bpb(model, tokens, **TTT, ttt_freeze_blocks=2, ttt_freeze_embeddings=True)
    assert frozen_all["trainable_params"] == 1  # only the smear gate scalar is left to adapt
    ema = bpb(model, tokens, **TTT, ttt_ema=0.5)
    assert ema["val_bpb"] != result["val_bpb"] and ema["val_bpb"] < base["val_bpb"]


def test_lora_ttt_learns_within_documents_and_resets_between_them():
    torch.manual_seed(0)
    model = TinyLM(seq_len=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = pattern_docs(6, 20, 4)  # each document repeats its own pattern, beyond the window
    base = bpb(model, tokens, mode="sliding", stride=4, doc_aware=True)
    rec = TokenRecorder(len(tokens))
    result = evaluate(model, tokens, tables(), EvalConfig(**LORA), recorder=rec)
    assert result["val_bpb"] < 0.75 * base["val_bpb"]
    assert (rec.count[1:] == 1).all() and result["tokens"] == len(tokens) - 1
    assert result["lora_batches"] == 2 and result["plain_batches"] == 0 and result["doc_aware"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # reset per document: a document's scores do not depend on the documents adapted with or before it
    alone = TokenRecorder(len(tokens))
    evaluate(model, tokens, tables(), EvalConfig(**dict(LORA, lora_batch_docs=1)), recorder=alone)
    np.testing.assert_allclose(alone.nll[1:], rec.nll[1:], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("make", [lambda: TinyLM(seq_len=16), tiny_gpt], ids=["stand-in", "pgolf-gpt"])
def test_lora_path_without_learning_reproduces_the_model_with_chunk_contexts(make):
    """lr 0: the LoRA path (hidden states, head and softcap computed in lora_ttt) must give the model's own
    score of each target, with the context its chunk's window gives (up to `window` tokens back from the
    chunk's last target, never before the document's BOS)."""
    torch.manual_seed(0)
    model = make()
    tokens = random_docs(5, 5, 45, seed=3)
    rec = TokenRecorder(len(tokens))
    evaluate(model, tokens, tables(), EvalConfig(**dict(LORA, lora_lr=0.0, lora_chunk=6)), recorder=rec)
    starts = list(doc_starts(tokens)) + [len(tokens) - 1]
    for s, hi in zip(starts[:-1], starts[1:]):
        for p in range(s + 1, hi + 1):
            chunk_end = min(s + 1 + ((p - s - 1) // 6 + 1) * 6 - 1, hi)
            a = max(s, chunk_end - 16)
            x = torch.from_numpy(tokens[None, a:p + 1])
            with torch.no_grad():
                ref = model(x[:, :-1], targets=x[:, 1:], reduction="none")[0, -1].item()
            assert rec.nll[p] == pytest.approx(ref, rel=1e-4, abs=1e-4), p


def test_global_phases_carry_what_earlier_documents_taught():
    torch.manual_seed(0)
    model = TinyLM(seq_len=16)
    tokens = repeated_docs(8, 60)
    cfg = dict(LORA, lora_lr=1e-6, phase_prefix_docs=6, phase_lr=0.3, phase_epochs=2, ttt_chunk_tokens=120)
    no_phase = bpb(model, tokens, **cfg)
    phased = bpb(model, tokens, **dict(cfg, phases=3))
    assert phased["phase_boundaries"] == [2, 4, 6] and phased["phases_run"] == 3
    assert phased["val_bpb"] < 0.8 * no_phase["val_bpb"]
    assert phase_bounds(100, EvalConfig(phase_boundaries=(10, 50, 200))) == [10, 50]
    groups = phase_groups(tokens, EvalConfig(phases=3, phase_prefix_docs=6))
    np.testing.assert_array_equal(groups, [0, 0, 1, 1, 2, 2, 3, 3])


def test_budget_stops_optional_work_but_scores_everything():
    torch.manual_seed(0)
    model = TinyLM(seq_len=16)
    tokens = repeated_docs(6, 50)
    for mode_cfg, plain in ((TTT, dict(mode="sliding", stride=4)),
                            (dict(LORA, phases=2, phase_prefix_docs=4), dict(mode="sliding", stride=4,
                                                                              doc_aware=True))):
        out = bpb(model, tokens, **mode_cfg, time_budget_seconds=0.0, budget_margin_seconds=0.0)
        ref = bpb(model, tokens, **plain)
        assert out["tokens"] == len(tokens) - 1
        assert out["val_bpb"] == pytest.approx(ref["val_bpb"], rel=1e-6)
        assert out["skipped"]
    assert out.get("phases_run") == 0 and out["lora_batches"] == 0 and out["plain_batches"] == 3


def test_budget_gate_and_phase_times():
    now = [0.0]
    budget = EvalBudget(limit_seconds=100, margin_seconds=10, clock=lambda: now[0])
    with budget.phase("score"):
        now[0] += 30
    assert budget.seconds == {"score": 30}
    assert budget.allow("ttt_train", estimate_seconds=40, reserve_seconds=20)
    assert not budget.allow("ttt_train", estimate_seconds=40, reserve_seconds=21)
    assert not budget.allow("ttt_train", estimate_seconds=0)  # once stopped, stays stopped
    assert budget.allow("other", estimate_seconds=0)
    assert budget.report()["skipped"] == {"ttt_train": 2}


def test_param_selection_freezes_embeddings_and_first_blocks():
    model = TinyLM(layers=3)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = [names[id(p)] for p in select_params(model, freeze_embeddings=True, freeze_blocks=2)]
    assert "tok_emb.weight" not in chosen
    assert not any(n.startswith(("blocks.0.", "blocks.1.")) for n in chosen)
    assert any(n.startswith("blocks.2.") for n in chosen)
    assert len(select_params(model, False, 0)) == len(list(model.parameters()))
    assert chunk_ranges(10, 4) == [(1, 4), (5, 8), (9, 9)]


# ------------------------------------------------------------------------------------------- distributed

CASES = {"sliding": dict(mode="sliding", stride=4, doc_aware=True, batch=2), "ttt": dict(TTT, ttt_chunk_tokens=60),
         "lora": dict(LORA, phases=2, phase_prefix_docs=6, phase_lr=0.1, ttt_chunk_tokens=60)}


def _tokens() -> np.ndarray:
    return random_docs(10, 8, 40, seed=7)


def _model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(seq_len=16)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {k: evaluate(_model(), _tokens(), tables(), EvalConfig(**cfg))["val_bpb"] for k, cfg in CASES.items()}
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()
    # gloo's threads sometimes abort the interpreter's normal shutdown (SIGABRT after all work is done)
    os._exit(0)


@pytest.mark.distributed
def test_two_ranks_match_one(tmp_path):
    out = str(tmp_path / "result.json")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    with open(out) as fh:
        two = json.load(fh)
    for key, cfg in CASES.items():
        one = evaluate(_model(), _tokens(), tables(), EvalConfig(**cfg))["val_bpb"]
        assert two[key] == pytest.approx(one, rel=1e-4), key
