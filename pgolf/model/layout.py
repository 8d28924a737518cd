"""Where blocks run and which tokens see each other: layer lists, the recurrent schedule, document boundaries.

Schedule (as in the record): the physical layers 0..L-1, with recurrence on the segment loop_start..loop_end
(inclusive) repeated loop_count times: 0..a-1, (a..b) x k, b+1..L-1. With U-Net skips the sequence splits in
half: the first half ("encoder", floor(n/2) blocks) pushes its outputs, the second half ("decoder") pops them
LIFO, decoder position j using skip weight j. The number of skip weights is fixed by the longest schedule, so
the looped schedule owns more of them than the plain one uses.
"""
from __future__ import annotations

import torch

from pgolf.model.config import ModelConfig


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """'all' | 'none' | '' | 'last:N' | '3,4,5' -> sorted physical layer indices."""
    text = spec.strip().lower()
    if text in ("", "none"):
        return ()
    if text == "all":
        return tuple(range(num_layers))
    if text.startswith("last:"):
        try:
            n = int(text[5:])
        except ValueError:
            raise ValueError(f"bad layer spec {spec!r}: 'last:N' needs an integer N") from None
        if not 0 <= n <= num_layers:
            raise ValueError(f"bad layer spec {spec!r}: N must be in [0, {num_layers}]")
        return tuple(range(num_layers - n, num_layers))
    try:
        layers = sorted({int(t) for t in text.replace(",", " ").split()})
    except ValueError:
        raise ValueError(f"bad layer spec {spec!r}: use 'all', 'none', 'last:N' or a list like '9,10'") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"bad layer spec {spec!r}: layers {bad} outside [0, {num_layers})")
    return tuple(layers)


def layer_sequence(cfg: ModelConfig, looping: bool) -> list[int]:
    """Physical layer index of each virtual layer, in execution order."""
    if not (looping and cfg.looped):
        return list(range(cfg.num_layers))
    seg = list(range(cfg.loop_start, cfg.loop_end + 1))
    return list(range(cfg.loop_start)) + seg * cfg.loop_count + list(range(cfg.loop_end + 1, cfg.num_layers))


def split_encoder_decoder(cfg: ModelConfig, looping: bool) -> tuple[list[int], list[int]]:
    """(encoder, decoder) physical indices; without U-Net skips everything is 'decoder' (no pushes)."""
    seq = layer_sequence(cfg, looping)
    if not cfg.unet_skips:
        return [], seq
    half = len(seq) // 2
    return seq[:half], seq[half:]


def num_skip_weights(cfg: ModelConfig) -> int:
    if not cfg.unet_skips:
        return 0
    return max(min(len(e), len(d)) for e, d in (split_encoder_decoder(cfg, False), split_encoder_decoder(cfg, True)))


def doc_cu_seqlens(input_ids: torch.Tensor, bos_id: int, doc_mask: bool = True,
                   max_docs_per_row: int = 64) -> torch.Tensor:
    """Cumulative segment starts (int32) of the packed (B*T) batch: every row start and, with `doc_mask`,
    every BOS position. The attention treats each [cu[i], cu[i+1]) as an independent causal sequence.

    `max_docs_per_row` K > 0: static length B*min(K, T)+1 (compile-friendly, no host sync); unused slots repeat
    the row end, i.e. empty segments. A row with more than K segments would merge documents, so it fails a
    device-side assertion instead. K = 0: exact length via nonzero (data-dependent shape, one host sync).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"pgolf.model.layout.doc_cu_seqlens: input_ids must be (B, T), got {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    n = b * t
    device = input_ids.device
    if not doc_mask:
        return torch.arange(0, n + 1, t, dtype=torch.int32, device=device)
    starts = input_ids == bos_id
    starts[:, 0] = True
    if max_docs_per_row <= 0:
        pos = torch.nonzero(starts.reshape(-1)).squeeze(1)
        return torch.cat([pos, pos.new_full((1,), n)]).to(torch.int32)
    k = min(max_docs_per_row, t)
    col = torch.arange(t, device=device)
    key = torch.where(starts, col, torch.full_like(col, t))
    if k < t:
        torch._assert_async((starts.sum(dim=1) <= k).all(),
                            f"pgolf.model: a row holds more than max_docs_per_row={k} documents; raise it")
        key = torch.topk(key, k, dim=1, largest=False, sorted=True).values
    else:
        key = torch.sort(key, dim=1).values
    cu = (key + torch.arange(b, device=device)[:, None] * t).reshape(-1)
    return torch.cat([cu, cu.new_full((1,), n)]).to(torch.int32)
