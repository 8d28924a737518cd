"""Small stand-ins for the evaluator tests: a causal LM with the pgolf model contract, byte tables, streams.

TinyLM follows pgolf.model's interface: model(ids, targets, reduction="none") -> per-token NLL (B, T) float32,
model(ids) -> logits, hidden(ids) and head_weight() for the LoRA path; config.doc_mask isolates documents.
Like the real model it keeps its projections as raw parameters used through F.linear and its head tied to the
embedding. It has no positional encoding, so a
token's score depends only on the tokens of its context, not on where the window puts them: sliding, packed
and full-context scores agree to rounding. `smear=True` adds a SmearGate (x_t += g * x_{t-1}); with
`smear_bos_mask=False` it mixes the previous document into a BOS position: the planted cross-document leak.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pgolf
from pgolf.eval.bpb import ByteTables


class Attn(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.w_q, self.w_k, self.w_v = (nn.Parameter(torch.randn(dim, dim) / dim ** 0.5) for _ in range(3))
        self.w_o = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = (F.linear(x, w).view(b, t, h, d // h).transpose(1, 2) for w in (self.w_q, self.w_k, self.w_v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return F.linear(y.transpose(1, 2).reshape(b, t, d), self.w_o)


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(2 * dim, dim) / dim ** 0.5)
        self.w_down = nn.Parameter(torch.randn(dim, 2 * dim) / (2 * dim) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(x, self.w_up)).square(), self.w_down)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = Attn(dim, heads)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(F.rms_norm(x, (x.size(-1),)), mask)
        return x + self.mlp(F.rms_norm(x, (x.size(-1),)))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 48, dim: int = 32, layers: int = 2, heads: int = 2, seq_len: int = 32,
                 doc_mask: bool = True, smear: bool = False, smear_bos_mask: bool = True):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, seq_len=seq_len, doc_mask=doc_mask, max_docs_per_row=0,
                                      logit_softcap=0.0)
        self.tok_emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.smear = smear
        self.smear_bos_mask = smear_bos_mask
        self.smear_gate = nn.Parameter(torch.tensor(0.5))

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids)
        if self.smear:
            gate = self.smear_gate * torch.ones_like(input_ids[:, 1:, None], dtype=x.dtype)
            if self.smear_bos_mask:
                gate = gate.masked_fill((input_ids[:, 1:] == pgolf.BOS_ID)[..., None], 0.0)
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        t = input_ids.size(1)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None]
        if self.config.doc_mask:
            doc = torch.cumsum((input_ids == pgolf.BOS_ID).long(), dim=1)
            mask = mask & (doc[:, :, None] == doc[:, None, :])
        for block in self.blocks:
            x = block(x, mask)
        return F.rms_norm(x, (x.size(-1),))

    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        logits = F.linear(self.hidden(input_ids), self.head_weight())
        if targets is None:
            return logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
        nll = nll.view_as(targets)
        return nll if reduction == "none" else nll.mean()


def tables(vocab: int = 48) -> ByteTables:
    """Ids 0-3 are control tokens (0 bytes); id i >= 4 stands for 1 + i % 3 bytes, a leading space when even."""
    ids = torch.arange(vocab)
    boundary = ids < 4
    base = torch.where(boundary, 0, 1 + ids % 3).to(torch.int32)
    lead = (~boundary) & (ids % 2 == 0)
    return ByteTables(base, lead, boundary)


def random_docs(n_docs: int, min_len: int, max_len: int, vocab: int = 48, seed: int = 0) -> np.ndarray:
    """BOS-led documents of random non-control tokens, concatenated."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(n_docs):
        n = int(rng.integers(min_len, max_len + 1))
        parts.append(np.concatenate([[pgolf.BOS_ID], rng.integers(4, vocab, size=n - 1)]))
    return np.concatenate(parts).astype(np.int64)


def repeated_docs(n_docs: int, doc_len: int, vocab: int = 48, seed: int = 0) -> np.ndarray:
    """The same random document `n_docs` times: learnable by weights, not by a short context window."""
    rng = np.random.default_rng(seed)
    doc = np.concatenate([[pgolf.BOS_ID], rng.integers(4, vocab, size=doc_len - 1)])
    return np.tile(doc, n_docs).astype(np.int64)


def pattern_docs(n_docs: int, pattern_len: int, reps: int, vocab: int = 48, seed: int = 0) -> np.ndarray:
    """Documents that each repeat their own random pattern `reps` times: learnable within a document."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(n_docs):
        pattern = rng.integers(4, vocab, size=pattern_len)
        parts.append(np.concatenate([[pgolf.BOS_ID], np.tile(pattern, reps)]))
    return np.concatenate(parts).astype(np.int64)


def tiny_gpt(vocab: int = 48, **overrides):
    """pgolf's GPT, small, looped, two lanes, BigramHash, with every identity-initialized path made to matter."""
    from pgolf.model import GPT, ModelConfig

    cfg = ModelConfig(vocab_size=vocab, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=16,
                      loop_start=1, loop_end=1, loop_count=2, parallel_from_layer=3, bigram_buckets=64,
                      bigram_dim=8, **overrides)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.set_recurrence(True)
    with torch.no_grad():  # leave the identity init: make every path (SmearGate, outputs, bigram) matter
        for name, p in model.named_parameters():
            if (p.dim() >= 2 and name.endswith(("w_o", "w_down"))) or name.startswith("bigram.embed"):
                p.normal_(0, 0.2)
        model.smear.lam.fill_(1.0)
        model.smear.weight.normal_()
    return model
