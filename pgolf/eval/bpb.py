"""Exact val_bpb: NLL in nats summed in float64, over the UTF-8 bytes the scored tokens stand for.

Bytes of a target token (CHALLENGE.md), given the token before it:
- control tokens (BOS, EOS, PAD), unknown and unused tokens: 0;
- byte-fallback tokens (<0x..>): 1;
- otherwise the UTF-8 length of the piece without its leading U+2581 marker, plus 1 for the space that
  marker stands for -- unless the previous token is a control/unknown/unused one ("boundary"), since
  normalization strips leading whitespace: no space is counted right after BOS.
Summed over a document, this is the UTF-8 length of the decoded (normalized) text.

The rule lives in three lookup tables indexed by token id, kept on the evaluation device, so counting bytes
is two gathers and an add per batch, with no host round trip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SPACE_MARKER = "\u2581"


@dataclass
class ByteTables:
    base_bytes: torch.Tensor         # int32 [V]: bytes of the piece without the leading marker
    has_leading_space: torch.Tensor  # bool [V]: the piece starts with U+2581
    is_boundary: torch.Tensor        # bool [V]: control/unknown/unused: no space counted after it
    _by_device: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.numel())

    def to(self, device: torch.device | str) -> "ByteTables":
        device = torch.device(device)
        if self.base_bytes.device == device:
            return self
        if device not in self._by_device:
            self._by_device[device] = ByteTables(self.base_bytes.to(device), self.has_leading_space.to(device),
                                                 self.is_boundary.to(device))
        return self._by_device[device]


def build_byte_tables(sp, vocab_size: int | None = None, device: torch.device | str | None = None) -> ByteTables:
    """Tables from a sentencepiece processor. `vocab_size` may exceed the tokenizer's (a model with a padded
    embedding); ids beyond the tokenizer count as boundary tokens of 0 bytes."""
    n = int(sp.vocab_size())
    size = max(n, vocab_size or 0)
    base = torch.zeros(size, dtype=torch.int32)
    lead = torch.zeros(size, dtype=torch.bool)
    boundary = torch.ones(size, dtype=torch.bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARKER):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    tables = ByteTables(base, lead, boundary)
    return tables.to(device) if device is not None else tables


def token_bytes(prev_ids: torch.Tensor, tgt_ids: torch.Tensor, tables: ByteTables) -> torch.Tensor:
    """Bytes (int32, shape of tgt_ids) that each target token stands for, given the token before it."""
    t = tables.to(tgt_ids.device)
    prev_ids = prev_ids.to(tgt_ids.device)
    space = t.has_leading_space[tgt_ids] & ~t.is_boundary[prev_ids]
    return t.base_bytes[tgt_ids] + space.to(torch.int32)


def bits_per_byte(nll_sum: float, byte_sum: float) -> float:
    """(sum of NLL in nats / ln 2) / bytes."""
    if byte_sum <= 0:
        raise ValueError(f"no bytes to score (byte_sum={byte_sum})")
    return float(nll_sum) / math.log(2.0) / float(byte_sum)


class BpbAccumulator:
    """Running float64 sums of NLL (nats), bytes and tokens; reduce across ranks, then read bpb/loss."""

    def __init__(self, tables: ByteTables, device: torch.device | str | None = None):
        self.tables = tables
        self.device = torch.device(device) if device is not None else tables.base_bytes.device
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # nll, bytes, tokens

    def add(self, nll: torch.Tensor, prev_ids: torch.Tensor, tgt_ids: torch.Tensor) -> None:
        """Add per-token NLL (nats, same shape as tgt_ids) of targets `tgt_ids` preceded by `prev_ids`."""
        if nll.shape != tgt_ids.shape or prev_ids.shape != tgt_ids.shape:
            raise ValueError(f"shapes differ: nll {tuple(nll.shape)}, prev {tuple(prev_ids.shape)}, "
                             f"tgt {tuple(tgt_ids.shape)}")
        nbytes = token_bytes(prev_ids, tgt_ids, self.tables)
        step = torch.stack([nll.to(torch.float64).sum(), nbytes.to(torch.float64).sum(),
                            torch.tensor(float(tgt_ids.numel()), dtype=torch.float64, device=nll.device)])
        self.sums += step.to(self.device)

    def all_reduce(self) -> None:
        """Sum over ranks when torch.distributed is initialized (no-op otherwise)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        sums = self.sums
        if dist.get_backend() == "nccl" and sums.device.type != "cuda":
            sums = sums.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self.sums = sums.to(self.device)

    @property
    def nll_sum(self) -> float:
        return float(self.sums[0])

    @property
    def byte_sum(self) -> float:
        return float(self.sums[1])

    @property
    def token_count(self) -> int:
        return int(self.sums[2])

    def bpb(self) -> float:
        return bits_per_byte(self.nll_sum, self.byte_sum)

    def loss(self) -> float:
        """Mean NLL per token in nats."""
        if self.token_count == 0:
            raise ValueError("no tokens scored")
        return self.nll_sum / self.token_count
