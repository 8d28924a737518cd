"""Input-side extras of the records: BigramHash, SmearGate and the shared value embedding.

None of them may read across a document: at a BOS position the "previous token" belongs to another document,
so BigramHash uses its no-previous bucket there and SmearGate's gate is 0 there (the PR #1851 fix). Row starts
have no previous token in the row at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.mlp import init_matrix

BIGRAM_MUL_CUR = 36313
BIGRAM_MUL_PREV = 27191
BIGRAM_INIT_SCALE = 0.05
VALUE_EMBED_INIT_STD = 0.01
VALUE_EMBED_INIT_SCALE = 0.1


def bigram_index(input_ids: torch.Tensor, buckets: int, bos_id: int | None) -> torch.Tensor:
    """(B, T) bucket of each (previous, current) pair: (36313*cur XOR 27191*prev) mod (buckets-1).
    Positions without a previous token (row start; BOS when `bos_id` is given) get bucket buckets-1."""
    ids = input_ids.long()
    cur, prev = ids[:, 1:], ids[:, :-1]
    last = buckets - 1
    idx = torch.bitwise_xor(BIGRAM_MUL_CUR * cur, BIGRAM_MUL_PREV * prev) % last
    if bos_id is not None:
        idx = torch.where(cur == bos_id, torch.full_like(idx, last), idx)
    return torch.cat([torch.full_like(ids[:, :1], last), idx], dim=1)


class BigramHash(nn.Module):
    """scale * proj(embed[bigram_index]): embedding zero-init, projection orthogonal, scale 0.05 (PR #1473)."""

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_id: int | None):
        super().__init__()
        self.buckets = buckets
        self.bos_id = bos_id
        self.embed = nn.Embedding(buckets, dim)
        self.proj = nn.Parameter(torch.empty(model_dim, dim))
        self.scale = nn.Parameter(torch.empty(()))

    def reset_parameters(self, ortho: bool) -> None:
        nn.init.zeros_(self.embed.weight)
        init_matrix(self.proj, ortho)
        nn.init.constant_(self.scale, BIGRAM_INIT_SCALE)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(bigram_index(input_ids, self.buckets, self.bos_id))
        return self.scale.to(e.dtype) * F.linear(e, self.proj.to(e.dtype))


class SmearGate(nn.Module):
    """x_t <- x_t + lam * sigmoid(W x_t[:window]) * x_{t-1} (t >= 1 in the row); W and lam zero-init, so it
    starts as the identity. With `bos_id`, the gate is 0 where the current token is BOS."""

    def __init__(self, window: int, bos_id: int | None):
        super().__init__()
        self.window = window
        self.bos_id = bos_id
        self.weight = nn.Parameter(torch.empty(1, window))
        self.lam = nn.Parameter(torch.empty(1))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.lam)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        cur = x[:, 1:]
        g = self.lam.to(x.dtype) * torch.sigmoid(F.linear(cur[..., : self.window], self.weight.to(x.dtype)))
        if self.bos_id is not None:
            g = g.masked_fill((input_ids[:, 1:] == self.bos_id)[..., None], 0.0)
        return torch.cat([x[:, :1], cur + g * x[:, :-1]], dim=1)


class ValueEmbedding(nn.Module):
    """One table shared by all VE layers: scale * proj(embed[ids]) of KV width; each layer multiplies it by
    its own scale (Attention.ve_scale) and adds it to its values. Table ~ N(0, 0.01), proj orthogonal,
    scale 0.1 (PR #1473)."""

    def __init__(self, vocab_size: int, dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.proj = nn.Parameter(torch.empty(kv_dim, dim))
        self.scale = nn.Parameter(torch.empty(()))

    def reset_parameters(self, ortho: bool) -> None:
        nn.init.normal_(self.embed.weight, std=VALUE_EMBED_INIT_STD)
        init_matrix(self.proj, ortho)
        nn.init.constant_(self.scale, VALUE_EMBED_INIT_SCALE)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(input_ids)
        return self.scale.to(e.dtype) * F.linear(e, self.proj.to(e.dtype))
