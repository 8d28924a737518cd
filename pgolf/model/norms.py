"""Parameter-free RMSNorm, the only norm the records use (no learned gain: the block scales carry it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, eps = torch's default for the dtype."""
    return F.rms_norm(x, (x.size(-1),))
