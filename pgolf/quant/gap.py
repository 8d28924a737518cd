"""The quantization gap of each option: val_bpb of one trained model after each quantizer setting, minus before.

Every option starts from the same Hessians and the same base QuantConfig; the artifact bytes are those of the rANS
pipeline (the fastest coder, and the one `best` picked on a trained model), so the byte column compares options,
not compressors. `pgolf quant CKPT --gap-table` runs it and writes bench/results/quant_gap.json.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch

from pgolf.quant.config import QuantConfig

OPTIONS: dict[str, dict[str, Any]] = {
    "rtn sdclip": dict(gptq=False, lqer_rank=0),
    "gptq sdclip": dict(lqer_rank=0),
    "gptq sdclip + lqer r4": dict(lqer_rank=4),
    "gptq percentile 99.95": dict(clip_mode="percentile", lqer_rank=0),
    "gptq adaptive clip + mixed 5/6/7": dict(clip_mode="adaptive", mixed_bits=True, bits_choices="5,6,7", lqer_rank=0),
    "gptq sdclip + hadamard": dict(hadamard=True, lqer_rank=0),
    "gptq sdclip + awq": dict(awq=True, lqer_rank=0),
    "gptq sdclip, eager sweep": dict(lqer_rank=0, kernels="reference", same_ints_as="gptq sdclip"),
}
"""Option -> QuantConfig changes; `kernels` runs that option under PGOLF_KERNELS=<value> (the eager GPTQ sweep
beside the Triton one) and `same_ints_as` reports the fraction of integers equal to that earlier option's."""


def same_int_fraction(a: dict, b: dict) -> float:
    """Fraction of quantized weights with equal integers in two {name: QTensor} sets of the same tensors."""
    equal = total = 0
    for name, qt in a.items():
        equal += int((qt.q == b[name].q).sum())
        total += qt.q.numel()
    return equal / max(total, 1)


def gap_rows(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
             base: QuantConfig, score: Callable[[dict[str, torch.Tensor]], float],
             options: dict[str, dict[str, Any]] | None = None,
             device: torch.device | str | None = None) -> list[dict[str, Any]]:
    """One row per option: val_bpb (by `score`, a state_dict -> val_bpb function), gap, model bytes, seconds."""
    from pgolf.kernels.dispatch import kernels_mode
    from pgolf.quant.artifact import export_state_dict

    reference = score(state_dict)
    rows = [{"option": "unquantized", "val_bpb": reference, "gap_bpb": 0.0, "model_bytes": None, "seconds": 0.0}]
    done: dict[str, dict] = {}
    for name, option in (options or OPTIONS).items():
        changes = {k: v for k, v in option.items() if k not in ("kernels", "same_ints_as")}
        cfg = base.replace(**{**changes, "compressor": "rans", "report_only": True})
        with kernels_mode(option["kernels"]) if "kernels" in option else contextlib.nullcontext():
            t0 = time.perf_counter()
            qm, report = export_state_dict(state_dict, hessians, cfg, {"model_config": model_config}, None, device)
            seconds = time.perf_counter() - t0
        done[name] = qm.tensors
        bpb = score(qm.state_dict())
        r = {"option": name, "val_bpb": bpb, "gap_bpb": bpb - reference, "model_bytes": report["model_bytes"],
             "seconds": seconds}
        if option.get("same_ints_as") in done:
            r["same_ints"] = same_int_fraction(qm.tensors, done[option["same_ints_as"]])
        rows.append(r)
    return rows
