"""A tiny stand-in for the real model: tied embedding/head, a looped block, a final norm, small tensors."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d // 2, bias=False)
        self.mlp_up = nn.Linear(d, 2 * d, bias=False)
        self.mlp_down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.q(h) + self.k(h).repeat(1, 1, 2)
        return x + self.mlp_down(torch.relu(self.mlp_up(self.norm(x))))


class Toy(nn.Module):
    """Embedding -> block 0 -> block 1 (run twice: a looped layer) -> final norm -> tied head."""

    def __init__(self, vocab: int = 97, d: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.register_buffer("calls", torch.tensor(7))

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = self.blocks[0](x)
        x = self.blocks[1](x)
        x = self.blocks[1](x)
        return self.final_norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids) * self.gain)
