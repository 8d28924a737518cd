"""Leak checker for any model + evaluator: change what a score must not see, and watch the score.

A scorer is a function tokens -> per-target NLL (array of len(tokens); entry p scores x[p], entry 0 unused).
Three checks, each a handful of re-evaluations of a (small) stream:

- causality: replace every token after position t (BOS positions kept, so documents keep their shape); the
  scores of targets <= t must not change. Catches reading future tokens, and TTT that trains on a chunk
  before scoring it (a target early in the chunk then depends on later ones).
- isolation (document-aware evaluators): replace the tokens of a random half of the documents; the scores of
  the other documents must not change (`isolation_splits` random halves). A document's targets are those
  whose last context token lies in it (its final target is the next document's BOS). With `doc_groups`
  (adaptation across documents, e.g. phased TTT where a phase trains on the documents of earlier groups), the
  halves are drawn within one group g and only documents of groups <= g must stay put.
  Catches a SmearGate/BigramHash without its BOS mask, attention without a doc mask, state carried between
  documents packed in a row.
- probability mass: put k distinct tokens at one position q in turn; the probabilities exp(-NLL) of x[q] under
  a legal scorer come from one distribution over the vocabulary (fixed by x[<q]), so they sum to <= 1.
  A scorer that sees its own target (an off-by-one shift, training on the target first) exceeds 1.

Legal but order-changing evaluators (documents scored out of stream order) would fail causality by design;
pgolf's evaluators keep stream order across adaptation, so the check applies to all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

import pgolf
from pgolf.eval.evaluate import evaluate
from pgolf.eval.sliding import TokenRecorder, doc_starts

ScoreFn = Callable[[np.ndarray], np.ndarray]
FIRST_REGULAR_ID = 4  # ids 0-3: pad, bos, eos, unk


@dataclass
class LeakReport:
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_leaky(self) -> None:
        if self.problems:
            raise AssertionError("pgolf.eval.leak: " + "; ".join(self.problems))


def _replace(tokens: np.ndarray, positions: np.ndarray, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    """Copy with every position given a different regular token (never a BOS or another control id)."""
    out = tokens.copy()
    positions = positions[tokens[positions] != pgolf.BOS_ID]
    span = vocab_size - FIRST_REGULAR_ID
    if span < 2:
        raise ValueError(f"vocab_size {vocab_size} leaves fewer than 2 regular token ids to perturb with")
    shift = rng.integers(1, span, size=len(positions))
    cur = np.clip(tokens[positions], FIRST_REGULAR_ID, vocab_size - 1) - FIRST_REGULAR_ID
    out[positions] = FIRST_REGULAR_ID + (cur + shift) % span
    return out


def _changed(base: np.ndarray, new: np.ndarray, targets: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    a, b = base[targets], new[targets]
    bad = ~np.isclose(a, b, atol=atol, rtol=rtol)
    return targets[bad]


def check_leaks(score_fn: ScoreFn, tokens: np.ndarray, vocab_size: int, *, cuts: Sequence[int] | None = None,
                n_cuts: int = 3, doc_isolation: bool = False, doc_groups: np.ndarray | None = None,
                isolation_splits: int = 2, mass_positions: Sequence[int] | None = None,
                n_mass: int = 1, alternatives: int = 3, atol: float = 1e-5, rtol: float = 1e-5,
                mass_tol: float = 1e-4, seed: int = 0) -> LeakReport:
    """Run the checks of the module docstring on `score_fn` over `tokens`; returns a LeakReport."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    rng = np.random.default_rng(seed)
    report = LeakReport()
    base = np.asarray(score_fn(tokens), dtype=np.float64)
    if base.shape != (n,) or not np.isfinite(base[1:]).all():
        missing = np.flatnonzero(~np.isfinite(base[1:])) + 1 if base.shape == (n,) else []
        report.problems.append(f"scorer must score every target 1..{n - 1} (shape {base.shape}, "
                               f"unscored {list(missing[:5])})")
        return report

    if cuts is None:
        cuts = sorted(rng.choice(np.arange(1, n - 1), size=min(n_cuts, n - 2), replace=False).tolist())
    if any(not 1 <= t < n - 1 for t in cuts):
        raise ValueError(f"cuts must lie in [1, {n - 2}] for a stream of {n} tokens, got {list(cuts)}")
    for t in cuts:
        scores = np.asarray(score_fn(_replace(tokens, np.arange(t + 1, n), vocab_size, rng)))
        bad = _changed(base, scores, np.arange(1, t + 1), atol, rtol)
        report.checks.append(f"causality t={t}")
        if len(bad):
            p = int(bad[0])
            report.problems.append(f"causality: changing tokens after position {t} changed {len(bad)} earlier "
                                   f"scores (target {p}: {base[p]:.6g} -> {scores[p]:.6g})")

    if doc_isolation:
        starts = doc_starts(tokens)
        owner = np.searchsorted(starts, np.arange(n) - 1, side="right") - 1  # document of target p's context
        pos_doc = np.searchsorted(starts, np.arange(n), side="right") - 1  # document of position p
        groups = np.zeros(len(starts), dtype=np.int64) if doc_groups is None else np.asarray(doc_groups)
        if groups.shape != (len(starts),):
            raise ValueError(f"doc_groups needs one group per document ({len(starts)}), got shape {groups.shape}")
        for g in np.unique(groups).tolist():
            members = np.flatnonzero(groups == g)
            for split in range(isolation_splits if len(members) > 1 else 0):
                changed = rng.permutation(members)[: len(members) // 2]
                guarded = np.setdiff1d(np.flatnonzero(groups <= g), changed)
                positions = np.flatnonzero(np.isin(pos_doc, changed))
                scores = np.asarray(score_fn(_replace(tokens, positions, vocab_size, rng)))
                bad = _changed(base, scores, np.flatnonzero(np.isin(owner, guarded)), atol, rtol)
                report.checks.append(f"isolation group={g} split={split}")
                if len(bad):
                    p = int(bad[0])
                    report.problems.append(
                        f"isolation: changing documents {changed[:4].tolist()}... changed {len(bad)} scores of "
                        f"other documents (target {p} of document {int(owner[p])}: {base[p]:.6g} -> "
                        f"{scores[p]:.6g})")

    if mass_positions is None:
        candidates = np.flatnonzero(tokens[1:] != pgolf.BOS_ID) + 1
        mass_positions = rng.choice(candidates, size=min(n_mass, len(candidates)), replace=False).tolist()
    for q in mass_positions:
        pool = np.setdiff1d(np.arange(FIRST_REGULAR_ID, vocab_size), [tokens[q]])
        mass = float(np.exp(-base[q]))
        for v in rng.choice(pool, size=min(alternatives, len(pool)), replace=False):
            pert = tokens.copy()
            pert[q] = v
            mass += float(np.exp(-np.asarray(score_fn(pert))[q]))
        report.checks.append(f"mass q={q}")
        if mass > 1.0 + mass_tol:
            report.problems.append(f"probability mass: {alternatives + 1} distinct tokens at position {q} have "
                                   f"probabilities summing to {mass:.4f} > 1 (the score sees its own target)")
    return report


def evaluator_scores(model, tables, cfg) -> ScoreFn:
    """A scorer running pgolf.eval.evaluate(model, tokens, tables, cfg) and returning every target's NLL."""

    def score(tokens: np.ndarray) -> np.ndarray:
        recorder = TokenRecorder(len(tokens))
        evaluate(model, tokens, tables, cfg, recorder=recorder)
        return recorder.nll

    return score
