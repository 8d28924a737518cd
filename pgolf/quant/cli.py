"""`pgolf quant CHECKPOINT`: calibrate, GPTQ-quantize, compress and size-check a trained checkpoint.

The checkpoint is a torch.save of {"model_config": dict, "model": state_dict} (the trainer's final.pt);
`load_checkpoint` is the only place here that knows that format.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from pgolf.config import add_arguments as add_config_arguments
from pgolf.config import resolve, to_dict
from pgolf.quant.config import QuantConfig

def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model_config, state_dict) of a checkpoint file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: expected a torch.save of {{'model_config': dict, 'model': state_dict}}")
    return dict(ckpt.get("model_config") or {}), ckpt["model"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="torch.save of {'model_config': dict, 'model': state_dict}")
    parser.add_argument("--out", default=None, help="artifact path [default: CHECKPOINT with suffix .pgq]")
    parser.add_argument("--code-file", action="append", default=[],
                        help="file whose size counts as code bytes (repeatable; adds to --code-bytes)")
    parser.add_argument("--calib-data", default=None, help="glob of token shards for --calib-source train")
    parser.add_argument("--device", default=None, help="cuda or cpu [default: cuda if present]")
    parser.add_argument("--report", default=None, help="write the JSON report here")
    parser.add_argument("--compare", action="store_true", help="also report each single compressor's size")
    add_config_arguments(parser, QuantConfig, "quantization (QuantConfig)")


def main(args: argparse.Namespace) -> int:
    from pgolf.quant.artifact import compressor_table, export_state_dict
    from pgolf.model import build_model
    from pgolf.quant.hessian import calibrate

    cfg = resolve(QuantConfig, args)
    code_bytes = cfg.code_bytes + sum(Path(f).stat().st_size for f in args.code_file)
    cfg = cfg.replace(code_bytes=code_bytes)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_config, state_dict = load_checkpoint(args.checkpoint)
    hessians: dict[str, torch.Tensor] = {}
    if cfg.calib_source != "none":
        if cfg.calib_source == "train" and not args.calib_data:
            raise SystemExit("pgolf quant: --calib-source train needs --calib-data GLOB (or use self/none)")
        hessians = calibrate(build_model(model_config, state_dict, device), cfg, args.calib_data, device)
    out = args.out or str(Path(args.checkpoint).with_suffix(".pgq"))
    meta = {"model_config": model_config, "quant_config": to_dict(cfg)}
    qm, report = export_state_dict(state_dict, hessians, cfg, meta, out, device)
    if args.compare:
        report["compressors"] = compressor_table(qm)
    summary = {k: report[k] for k in ("model_bytes", "code_bytes", "total_bytes", "budget_bytes", "headroom_bytes")}
    print(json.dumps({"artifact": out, **summary, "streams": report["streams"],
                      "quant_seconds": report["quant"]["seconds"]}, indent=1))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    return 0
