"""Small models for the quantization tests: a tiny stand-in for the real model (tied embedding/head, a looped block,
a final norm, small tensors), and pgolf's own GPT at toy size with every weight drawn at random."""
from __future__ import annotations

import torch
from torch import nn

from pgolf.model import build_model


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


def small_gpt_config(model_dim: int) -> dict:
    """pgolf GPT: vocab 64, 2 layers, 4 heads / 2 KV heads, no lanes or loop, one document per row."""
    return dict(vocab_size=64, num_layers=2, model_dim=model_dim, num_heads=4, num_kv_heads=2, rope_dims=4,
                seq_len=16, parallel_from_layer=-1, loop_count=1, max_docs_per_row=0)


def random_small_gpt(model_dim: int, std: float) -> nn.Module:
    """small_gpt_config's model after torch.manual_seed(0), every parameter drawn from N(0, std^2): quantization
    then has real values to round, and every path of the model matters."""
    torch.manual_seed(0)
    model = build_model(small_gpt_config(model_dim))
    for p in model.parameters():
        nn.init.normal_(p, std=std)
    return model
