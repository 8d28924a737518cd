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
    parser.add_argument("--gap-table", action="store_true",
                        help="instead of one artifact: val_bpb after each quantization option (pgolf.quant.gap), "
                             "written to bench/results/quant_gap.json")
    parser.add_argument("--val-files", default=None, help="validation shards for --gap-table [default: the "
                                                          "checkpoint's train_config.val_files]")
    parser.add_argument("--tokenizer-path", default=None, help="tokenizer for --gap-table [default: the "
                                                               "checkpoint's train_config.tokenizer_path]")
    parser.add_argument("--eval-tokens", type=int, default=1_048_576,
                        help="--gap-table scores the first N validation tokens in disjoint windows")
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
    if args.gap_table:
        return _gap_table(args, model_config, state_dict, hessians, cfg, device)
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


def _gap_table(args: argparse.Namespace, model_config: dict, state_dict: dict, hessians: dict, cfg: QuantConfig,
               device: torch.device) -> int:
    from pgolf.bench.harness import row, write_results
    from pgolf.data.loader import load_validation_tokens
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.eval.bpb import build_byte_tables
    from pgolf.eval.config import EvalConfig
    from pgolf.eval.evaluate import evaluate
    from pgolf.model import build_model
    from pgolf.quant.gap import gap_rows

    train = torch.load(args.checkpoint, map_location="cpu", weights_only=False).get("train_config") or {}
    val_files, tok = args.val_files or train.get("val_files"), args.tokenizer_path or train.get("tokenizer_path")
    if not val_files or not tok:
        raise SystemExit("pgolf quant --gap-table: give --val-files and --tokenizer-path (the checkpoint names none)")
    vocab = model_config["vocab_size"]
    tables = build_byte_tables(load_tokenizer(tok), vocab, device=device)
    tokens = load_validation_tokens(val_files, vocab)
    eval_cfg = EvalConfig(mode="chunks", max_tokens=args.eval_tokens)

    def score(state: dict) -> float:
        return evaluate(build_model(model_config, state, device), tokens, tables, eval_cfg)["val_bpb"]

    rows = gap_rows(model_config, state_dict, hessians, cfg, score, device=device)
    shape = (f"{model_config['num_layers']}L d{model_config['model_dim']} sp{vocab}, "
             f"{min(args.eval_tokens, len(tokens) - 1):,} val tokens")
    results = [row("quant_gap", r["option"], shape, 1000 * r["seconds"], val_bpb=round(r["val_bpb"], 5),
                   gap_bpb=round(r["gap_bpb"], 5), model_bytes=r["model_bytes"],
                   **({"same_ints": round(r["same_ints"], 6)} if "same_ints" in r else {})) for r in rows]
    print(f"{'option':36} {'val_bpb':>9} {'gap':>9} {'bytes':>12}")
    for r in rows:
        same = f"  same ints {r['same_ints']:.4%}" if "same_ints" in r else ""
        print(f"{r['option']:36} {r['val_bpb']:9.5f} {r['gap_bpb']:+9.5f} {r['model_bytes'] or '':>12}{same}")
    print(f"wrote {write_results('quant_gap', results)}")
    return 0
