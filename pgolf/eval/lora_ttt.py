"""Phased LoRA test-time training: per-document LoRA, score-first, with global SGD phases between documents.

Documents (BOS to the next BOS; each document's last target is the next BOS, as in pgolf.eval.sliding) are
processed in stream order, split by document-count boundaries into segments. Inside a segment:
  - documents are adapted `lora_batch_docs` at a time, each with its own LoRA weights (rank r, scale
    alpha/r; A kaiming-uniform, the same draw for every document, B zero, so a fresh LoRA is the identity),
    reset for every document;
  - a document's targets are taken in chunks of `lora_chunk` (48): the chunk is scored with the current LoRA
    (context: the document's tokens before it, at most `window`), then one AdamW step trains the LoRA on that
    chunk's loss. The last chunk of a document is only scored. Scoring and training share one forward.
  - the loss is the sum over documents of each document's mean chunk NLL, grad clipping (optional) is per
    document, and AdamW is elementwise, so documents in a batch never influence each other.
After a segment, a global phase runs SGD (pgolf.eval.ttt.sgd_pass) on the base weights over every target
scored so far (documents of this and earlier segments), so later segments start from the adapted base.
A score therefore depends only on its own document's earlier tokens and on documents of earlier segments;
pgolf.eval.leak checks this with `phase_groups` as the document groups.

Where the LoRA sits (pgolf.model's GPT keeps its projections as raw parameters used through F.linear, and
its head is fused with the loss): "q" "k" "v" "o" add x A^T B^T to F.linear calls whose weight is a matching
parameter (a TorchFunctionMode intercepts F.linear while the LoRA is attached, also through `.to(dtype)`
copies); "mlp" adds a parallel adapter (module input -> output) to modules named like `mlp`; "head" adds a
LoRA to the logits before the softcap. The head is computed here from `model.hidden(ids)` and
`model.head_weight()` (the GPT contract), only at the scored positions of each chunk. Other target strings
are regexes of parameter names (F.linear weights) or, prefixed `module:`, of module names (parallel adapters).
The LoRA path runs eagerly (no torch.compile).

Distributed split: within a segment, documents sorted by length are cut into batches dealt round robin to
ranks; each rank adapts and scores its own documents with no communication. The global phase is collective
(every rank trains on its share of the scored tokens, gradients all-reduced). Byte/NLL sums are all-reduced by
the caller at the end.

Budget: a LoRA batch's training is optional; when the estimated time of the rest would pass the limit, the
rank scores its remaining documents of the segment with plain document-aware sliding windows instead. Global
phases are optional too (a collective decision).
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pgolf.eval.sliding import Segments, TokenRecorder, as_tokens, autocast, layout, model_device, model_setting, \
    plan_sliding, rank_world, score_layout, segments
from pgolf.eval.ttt import cosine_lr, select_params, sgd_pass

PARAM_ALIASES = {"q": r"(^|\.)w_q$", "k": r"(^|\.)w_k$", "v": r"(^|\.)w_v$", "o": r"(^|\.)w_o$"}
MODULE_ALIASES = {"mlp": r"(^|\.)mlp$"}
NO_TRAIN_SPEEDUP = 3.0  # scoring without LoRA training is assumed this much faster (budget estimate)


class BatchedLoRA(nn.Module):
    """One LoRA per document of a batch: delta(x) = scale * (x A_b^T) B_b^T for row b of x (n, T, in)."""

    def __init__(self, n: int, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.bound = 1.0 / math.sqrt(in_features)
        self.A = nn.Parameter(torch.empty(n, rank, in_features))
        self.B = nn.Parameter(torch.zeros(n, out_features, rank))

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        """Every document starts from the same A (one draw) and B = 0."""
        self.A[:1].uniform_(-self.bound, self.bound, generator=generator)
        self.A.copy_(self.A[:1].expand_as(self.A).clone())
        self.B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (k, T, in) holds the first k <= n documents of the batch (those still being scored)."""
        if x.dim() != 3 or x.size(0) > self.A.size(0):
            raise ValueError(f"pgolf.eval.lora_ttt: LoRA input must be (docs<={self.A.size(0)}, T, in), got "
                             f"{tuple(x.shape)}")
        k = x.size(0)
        a, b = self.A[:k].to(x.dtype), self.B[:k].to(x.dtype)
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * self.scale


class _LinearLoRAMode(TorchFunctionMode):
    """While active, F.linear(x, w) gets + lora(x) when w is a registered parameter or a `.to()` copy of one."""

    def __init__(self, by_param: dict[int, BatchedLoRA]):
        super().__init__()
        self.by_param = by_param
        self.derived: dict[int, tuple[BatchedLoRA, torch.Tensor]] = {}

    def _lookup(self, t) -> BatchedLoRA | None:
        if not isinstance(t, torch.Tensor):
            return None
        hit = self.by_param.get(id(t))
        if hit is None and id(t) in self.derived and self.derived[id(t)][1] is t:
            hit = self.derived[id(t)][0]
        return hit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            lora = self._lookup(weight)
            if lora is not None:
                out = out + lora(args[0] if args else kwargs["input"]).to(out.dtype)
        elif func is torch.Tensor.to and args:
            lora = self._lookup(args[0])
            if lora is not None and isinstance(out, torch.Tensor) and out is not args[0]:
                self.derived[id(out)] = (lora, out)  # keeps `out` alive, so its id stays unique
        return out


def _match(pattern: str) -> re.Pattern:
    return re.compile(pattern)


class LoraBank(nn.Module):
    """The LoRA weights of one batch of documents for every target of the model."""

    def __init__(self, model: nn.Module, n_docs: int, targets: tuple[str, ...], rank: int, alpha: float):
        super().__init__()
        scale = alpha / rank
        self.n_docs = n_docs
        self.param_loras = nn.ModuleDict()
        self.module_loras = nn.ModuleDict()
        self.head = None
        self._param_of: dict[str, nn.Parameter] = {}
        self._module_of: dict[str, nn.Module] = {}
        head_w = model.head_weight()
        dim, vocab = head_w.shape[1], head_w.shape[0]
        param_res = [_match(PARAM_ALIASES.get(t, t)) for t in targets
                     if t != "head" and t not in MODULE_ALIASES and not t.startswith("module:")]
        module_res = [_match(MODULE_ALIASES.get(t, t[len("module:"):])) for t in targets
                      if t in MODULE_ALIASES or t.startswith("module:")]
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(r.search(name) for r in param_res):
                key = name.replace(".", "__")
                self.param_loras[key] = BatchedLoRA(n_docs, p.shape[1], p.shape[0], rank, scale)
                self._param_of[key] = p
        for name, m in model.named_modules():
            if name and any(r.search(name) for r in module_res):
                key = name.replace(".", "__")
                self.module_loras[key] = BatchedLoRA(n_docs, dim, dim, rank, scale)
                self._module_of[key] = m
        if "head" in targets:
            self.head = BatchedLoRA(n_docs, dim, vocab, rank, scale)
        if not (self.param_loras or self.module_loras or self.head is not None):
            raise ValueError(f"pgolf.eval.lora_ttt: LoRA targets {targets} match nothing in the model")

    def reset(self, seed: int = 0) -> None:
        """Fresh LoRAs from a private generator: the init depends on `seed` only, never on the global RNG or
        on what was evaluated before (re-evaluations, e.g. by the leak checker, reproduce every score), and it
        is the same for every document, so a score does not depend on the batch it was adapted in."""
        gen = torch.Generator(device=self.param_device())
        gen.manual_seed(seed)
        for m in self.modules():
            if isinstance(m, BatchedLoRA):
                m.reset(gen)

    def param_device(self) -> torch.device:
        return next(self.parameters()).device

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Make the model's forward apply these LoRAs (F.linear interception and module forward hooks)."""
        hooks = [m.register_forward_hook(lambda mod, inp, out, lora=self.module_loras[key]: out + lora(inp[0]).to(
            out.dtype)) for key, m in self._module_of.items()]
        mode = _LinearLoRAMode({id(self._param_of[k]): lora for k, lora in self.param_loras.items()})
        try:
            with mode:
                yield
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def clip_per_doc(self, max_norm: float) -> None:
        """Clip each document's LoRA gradient norm separately (a global clip would couple documents)."""
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        sq = sum(p.grad.float().pow(2).reshape(self.n_docs, -1).sum(1) for p in params)
        factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(factor.view(-1, *([1] * (p.dim() - 1))).to(p.grad.dtype))


def doc_segments(tokens: np.ndarray) -> Segments:
    return segments(tokens, doc_aware=True)


def phase_bounds(n_docs: int, cfg) -> list[int]:
    """Document counts after which a global phase runs (strictly inside (0, n_docs))."""
    if cfg.phase_boundaries:
        bounds = list(cfg.phase_boundaries)
    elif cfg.phases > 0:
        prefix = min(cfg.phase_prefix_docs, n_docs)
        bounds = [prefix * k // cfg.phases for k in range(1, cfg.phases + 1)]
    else:
        bounds = []
    return sorted({b for b in bounds if 0 < b < n_docs})


def phase_groups(tokens, cfg) -> np.ndarray:
    """Segment index of every document (the `doc_groups` of pgolf.eval.leak.check_leaks)."""
    n_docs = len(doc_segments(as_tokens(tokens)))
    return np.searchsorted(np.array(phase_bounds(n_docs, cfg), dtype=np.int64), np.arange(n_docs), side="right")


def _doc_batches(seg: Segments, idx: np.ndarray, batch_docs: int) -> list[np.ndarray]:
    """Documents `idx` sorted by target count (longest first) cut into batches."""
    counts = seg.hi[idx] - seg.lo[idx] + 1
    order = idx[np.argsort(-counts, kind="stable")]
    return [order[i:i + batch_docs] for i in range(0, len(order), batch_docs)]


class LoraScorer:
    """Scores and adapts one batch of documents at a time (module docstring)."""

    def __init__(self, model: nn.Module, tokens: np.ndarray, acc, cfg, window: int,
                 recorder: TokenRecorder | None):
        if not (hasattr(model, "hidden") and hasattr(model, "head_weight")):
            raise TypeError("pgolf.eval.lora_ttt needs model.hidden(ids) and model.head_weight() (pgolf.model.GPT)")
        self.model, self.tokens, self.acc, self.cfg, self.window = model, tokens, acc, cfg, window
        self.chunk = min(cfg.lora_chunk, window)  # a chunk must fit one window with its first target's context
        self.recorder = recorder
        self.device = model_device(model)
        self.softcap = float(model_setting(model, "logit_softcap", default=0.0) or 0.0)
        self.banks: dict[int, LoraBank] = {}

    def _bank(self, n: int, seed: int) -> LoraBank:
        if n not in self.banks:
            cfg = self.cfg
            self.banks[n] = LoraBank(self.model, n, tuple(cfg.lora_targets), cfg.lora_rank,
                                     cfg.lora_alpha).to(self.device)
        bank = self.banks[n]
        bank.reset(seed)
        return bank

    def nll(self, bank: LoraBank, x: torch.Tensor, sel: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(n, C) NLL of `labels` at columns `sel` of the rows x (n, T), LoRA attached."""
        with autocast(self.device, self.cfg.autocast), bank.attached():
            h = self.model.hidden(x)
            h = torch.gather(h, 1, sel[..., None].expand(-1, -1, h.size(-1)))
            w = self.model.head_weight().to(h.dtype)
            z = F.linear(h, w).float()
            if bank.head is not None:
                z = z + bank.head(h).float()
        if self.softcap > 0:
            z = self.softcap * torch.tanh(z / self.softcap)
        return F.cross_entropy(z.reshape(-1, z.size(-1)), labels.reshape(-1), reduction="none").view(labels.shape)

    def run_batch(self, seg: Segments, docs: np.ndarray, train: bool) -> None:
        """Docs are taken longest first, so the documents still being scored at chunk `ci` are the first rows:
        each step runs only those rows (a long document does not drag finished ones through the model), and
        every index is built on the host and sent in one copy, so a step never waits on the GPU."""
        cfg, tokens, window, chunk = self.cfg, self.tokens, self.window, self.chunk
        docs = docs[np.argsort(-(seg.hi[docs] - seg.lo[docs]), kind="stable")]
        start, lo, hi = seg.start[docs], seg.lo[docs], seg.hi[docs]
        n_chunks = (hi - lo) // chunk + 1
        bank = self._bank(len(docs), 0)
        opt = torch.optim.AdamW(bank.parameters(), lr=cfg.lora_lr, betas=(cfg.lora_beta1, cfg.lora_beta2),
                                weight_decay=cfg.lora_weight_decay, eps=1e-10) if train else None
        cols = np.arange(chunk)
        for ci in range(int(n_chunks.max())):
            k = int((n_chunks > ci).sum())
            c_lo = lo[:k] + ci * chunk
            c_hi = np.minimum(c_lo + chunk - 1, hi[:k])
            a = np.maximum(start[:k], c_hi - window)
            length = c_hi - a
            t = int(length.max())
            idx = a[:, None] + np.arange(t)[None]
            x = np.where(np.arange(t)[None] < length[:, None], tokens[np.minimum(idx, len(tokens) - 1)], 0)
            first = c_lo - 1 - a  # column of the chunk's first label
            sel = np.minimum(first[:, None] + cols[None], t - 1)
            mask = cols[None] <= (c_hi - c_lo)[:, None]
            target_pos = np.where(mask, a[:, None] + 1 + sel, 0)
            trains = ci < n_chunks[:k] - 1
            step = train and bool(trains.any())
            flat = np.flatnonzero(mask)
            scored_pos = target_pos.ravel()[flat]
            parts = [x.ravel(), sel.ravel(), tokens[target_pos].ravel(), flat, tokens[scored_pos - 1],
                     tokens[scored_pos], mask.ravel(), trains]
            dev = torch.from_numpy(np.concatenate([p.astype(np.int64) for p in parts])).to(self.device,
                                                                                            non_blocking=True)
            x_t, sel_t, labels, flat_t, prev_t, tgt_t, mask_t, trains_t = dev.split([p.size for p in parts])
            labels = labels.view(k, chunk)
            with torch.set_grad_enabled(step):
                nll = self.nll(bank, x_t.view(k, t), sel_t.view(k, chunk), labels)
            scored = nll.detach().reshape(-1)[flat_t]
            self.acc.add(scored, prev_t, tgt_t)
            if self.recorder is not None:
                self.recorder.add(scored_pos, scored)
            if step:
                weight = mask_t.view(k, chunk).to(nll.dtype)
                counts = weight.sum(1).clamp(min=1)
                loss = ((nll * weight).sum(1) / counts * trains_t.to(nll.dtype)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.lora_grad_clip > 0:
                    bank.clip_per_doc(cfg.lora_grad_clip)
                opt.step()

    def score_plain(self, seg: Segments, docs: np.ndarray) -> None:
        """Score documents without adaptation: document-aware sliding windows, this rank only."""
        sub = Segments(seg.start[docs], seg.lo[docs], seg.hi[docs])
        lay = layout(plan_sliding(sub, self.window, self.cfg.stride), self.tokens, self.window, self.cfg.batch,
                     pack=False)
        score_layout(self.model, lay, self.tokens, self.acc, self.device, self.cfg.autocast, self.recorder,
                     shard=False)


def run_lora_ttt(model: nn.Module, tokens: np.ndarray, acc, cfg, window: int, budget,
                 recorder: TokenRecorder | None = None) -> dict:
    """Mode "lora_ttt" on a copy of `model` (module docstring)."""
    work = copy.deepcopy(model)
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    device = model_device(work)
    rank, world = rank_world()
    seg = doc_segments(tokens)
    n_docs = len(seg)
    bounds = phase_bounds(n_docs, cfg)
    edges = [0] + bounds + [n_docs]
    scorer = LoraScorer(work, tokens, acc, cfg, window, recorder)
    targets_total = int((seg.hi - seg.lo + 1).sum())
    done_targets = 0
    lora_seconds, lora_targets = 0.0, 0
    phase_seconds, phase_targets = 0.0, 0
    phases_run, lora_batches, plain_batches = 0, 0, 0
    for s in range(len(edges) - 1):
        d0, d1 = edges[s], edges[s + 1]
        if s > 0:
            hi = int(seg.hi[d0 - 1])  # every target up to the last one of document d0-1 is scored
            rate = lora_seconds / max(lora_targets, 1) / NO_TRAIN_SPEEDUP
            estimate = phase_seconds / max(phase_targets, 1) * hi if phase_targets else 0.0
            if budget.allow("lora_phase", estimate, rate * (targets_total - done_targets)):
                t0 = time.perf_counter()
                with budget.phase("lora_phase"):
                    _global_phase(work, tokens, hi, cfg, window, device)
                phase_seconds += time.perf_counter() - t0
                phase_targets += hi
                phases_run += 1
        batches = _doc_batches(seg, np.arange(d0, d1), cfg.lora_batch_docs)
        mine = batches[rank::world]
        for bi, docs in enumerate(mine):
            n_t = int((seg.hi[docs] - seg.lo[docs] + 1).sum())
            rest = sum(int((seg.hi[b] - seg.lo[b] + 1).sum()) for b in mine[bi + 1:])
            later = (targets_total - done_targets) / world
            rate = lora_seconds / lora_targets if lora_targets else 0.0
            if budget.allow("lora_train", rate * n_t, rate / NO_TRAIN_SPEEDUP * (rest + later), sync=False):
                t0 = time.perf_counter()
                with budget.phase("lora_score_train"):
                    scorer.run_batch(seg, docs, train=True)
                lora_seconds += time.perf_counter() - t0
                lora_targets += n_t
                lora_batches += 1
            else:
                with budget.phase("score"):
                    scorer.score_plain(seg, docs)
                plain_batches += 1
        done_targets += int((seg.hi[d0:d1] - seg.lo[d0:d1] + 1).sum())
    return {"doc_aware": True, "documents": n_docs, "phase_boundaries": bounds, "phases_run": phases_run,
            "lora_batches": lora_batches, "plain_batches": plain_batches, "lora_chunk": scorer.chunk}


def _global_phase(model: nn.Module, tokens: np.ndarray, hi: int, cfg, window: int, device: torch.device) -> None:
    """SGD on the base weights over targets 1..hi (all scored), chunk by chunk with a cosine lr."""
    params = select_params(model, cfg.phase_freeze_embeddings, cfg.ttt_freeze_blocks)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.phase_lr, momentum=cfg.ttt_momentum)
    chunks = [(lo, min(lo + cfg.ttt_chunk_tokens - 1, hi)) for lo in range(1, hi + 1, cfg.ttt_chunk_tokens)]
    for c, (lo, c_hi) in enumerate(chunks):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.phase_lr, c, len(chunks) + 1, cfg.ttt_cosine)  # last chunk still learns
        sgd_pass(model, params, opt, tokens, lo, c_hi, cfg.ttt_seq_len or window, cfg.ttt_batch_seqs,
                 cfg.phase_epochs, cfg.ttt_grad_clip, device, cfg.autocast)
    for p in params:
        p.requires_grad_(False)
