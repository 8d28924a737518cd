"""The leak checker catches planted leaks (SmearGate without its BOS mask, TTT that trains before scoring, a
scorer that sees its own target) and passes every real evaluator, on the stand-in and on pgolf's GPT."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_stand_ins import TinyLM, random_docs, tables, tiny_gpt

from pgolf.eval.bpb import BpbAccumulator
from pgolf.eval.config import EvalConfig
from pgolf.eval.leak import check_leaks, evaluator_scores
from pgolf.eval.lora_ttt import phase_groups
from pgolf.eval.sliding import TokenRecorder, make_layout, plan_sliding, score_layout, segments
from pgolf.eval.ttt import chunk_ranges, select_params, sgd_pass

VOCAB = 48
TTT = dict(mode="ttt", stride=4, ttt_chunk_tokens=48, ttt_epochs=1, ttt_lr=0.3, ttt_batch_seqs=4,
           ttt_freeze_embeddings=False)
LORA = dict(mode="lora_ttt", stride=4, lora_lr=0.05, lora_rank=2, lora_alpha=4, lora_chunk=6, lora_batch_docs=3,
            phases=2, phase_prefix_docs=6, phase_lr=0.1, ttt_chunk_tokens=64)


@pytest.fixture
def tokens() -> np.ndarray:
    return random_docs(9, 4, 30, seed=11)


def check(model, tokens, doc_isolation: bool = False, groups=None, **cfg):
    return check_leaks(evaluator_scores(model, tables(VOCAB), EvalConfig(**cfg)), tokens, VOCAB,
                       doc_isolation=doc_isolation, doc_groups=groups)


def test_catches_smeargate_without_bos_mask(tokens):
    torch.manual_seed(0)
    leaky = TinyLM(seq_len=24, smear=True, smear_bos_mask=False)
    report = check(leaky, tokens, doc_isolation=True, mode="sliding", stride=4, doc_aware=True)
    assert not report.ok
    assert any(p.startswith("isolation") for p in report.problems)
    with pytest.raises(AssertionError, match="isolation"):
        report.raise_if_leaky()
    masked = TinyLM(seq_len=24, smear=True, smear_bos_mask=True)
    masked.load_state_dict(leaky.state_dict())
    assert check(masked, tokens, doc_isolation=True, mode="sliding", stride=4, doc_aware=True).ok


def test_catches_ttt_that_trains_before_scoring(tokens):
    torch.manual_seed(0)
    model = TinyLM(seq_len=16)
    cfg = EvalConfig(**TTT)

    def train_then_score(toks: np.ndarray) -> np.ndarray:
        work = copy.deepcopy(model)
        params = select_params(work, False, 0)
        opt = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
        rec, acc = TokenRecorder(len(toks)), BpbAccumulator(tables(VOCAB))
        seg = segments(toks, doc_aware=False)
        for lo, hi in chunk_ranges(len(toks), cfg.ttt_chunk_tokens):
            sgd_pass(work, params, opt, toks, lo, hi, 16, cfg.ttt_batch_seqs, 1, 1.0, torch.device("cpu"), False)
            lay = make_layout(plan_sliding(seg.restrict(lo, hi), 16, cfg.stride), toks, work, cfg, 16)
            score_layout(work, lay, toks, acc, torch.device("cpu"), False, rec)
        return rec.nll

    cuts = [20, 70, 120]  # inside chunks (targets 1-48, 49-96, ...)
    report = check_leaks(train_then_score, tokens, VOCAB, cuts=cuts)
    assert [p for p in report.problems if p.startswith("causality")]
    legal = check_leaks(evaluator_scores(model, tables(VOCAB), cfg), tokens, VOCAB, cuts=cuts)
    assert legal.ok, legal.problems


def test_catches_a_scorer_that_sees_its_own_target(tokens):
    torch.manual_seed(0)
    model = TinyLM(seq_len=64)

    def no_shift(toks: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(toks)[None]
        with torch.no_grad():
            logits = model(x)[0]
        nll = np.full(len(toks), np.nan)
        nll[1:] = F.cross_entropy(logits[1:], x[0, 1:], reduction="none").numpy()
        return nll

    report = check_leaks(no_shift, tokens, VOCAB, n_mass=2)
    assert any(p.startswith("probability mass") for p in report.problems)
    assert not any(p.startswith("causality") for p in report.problems)  # only the mass check sees it


@pytest.mark.parametrize("cfg,doc_isolation", [
    (dict(mode="sliding", stride=4), False),
    (dict(mode="sliding", stride=4, doc_aware=True), True),
    (dict(mode="sliding", stride=4, doc_aware=True, pack_docs=False), True),
    (dict(mode="chunks", doc_aware=True), True),
    (TTT, False),
    (dict(TTT, doc_aware=True, ttt_ema=0.5), False),
])
def test_real_evaluators_pass(tokens, cfg, doc_isolation):
    torch.manual_seed(0)
    model = TinyLM(seq_len=16, smear=True)
    report = check(model, tokens, doc_isolation=doc_isolation, **cfg)
    assert report.ok, report.problems
    assert len(report.checks) >= 4


def test_phased_lora_ttt_passes_with_phase_groups(tokens):
    torch.manual_seed(0)
    model = TinyLM(seq_len=16, smear=True)
    groups = phase_groups(tokens, EvalConfig(**LORA))
    assert groups.max() == 2
    report = check(model, tokens, doc_isolation=True, groups=groups, **LORA)
    assert report.ok, report.problems
    # without the groups, the phases' legal adaptation on earlier documents shows up as cross-document change
    assert not check(model, tokens, doc_isolation=True, **LORA).ok


def test_pgolf_gpt_passes_and_its_unmasked_smeargate_is_caught(tokens):
    model = tiny_gpt()
    report = check(model, tokens, doc_isolation=True, mode="sliding", stride=4, doc_aware=True)
    assert report.ok, report.problems
    lora = check(model, tokens, doc_isolation=True, groups=phase_groups(tokens, EvalConfig(**LORA)), **LORA)
    assert lora.ok, lora.problems
    leaky = tiny_gpt(smear_bos_mask=False)
    leaky.load_state_dict(model.state_dict())
    report = check(leaky, tokens, doc_isolation=True, mode="sliding", stride=4, doc_aware=True)
    assert any(p.startswith("isolation") for p in report.problems)
