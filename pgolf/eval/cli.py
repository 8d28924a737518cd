"""`pgolf eval CHECKPOINT_OR_ARTIFACT`: val_bpb of a trained checkpoint or a quantized artifact.

    pgolf eval runs/x/final.pt --mode sliding --stride 64
    torchrun --nproc_per_node=8 -m pgolf eval runs/x/model.pgq --mode lora_ttt --phases 3

A checkpoint is a torch.save of {"model_config": dict, "model": state_dict}; anything else is read as an
artifact through pgolf.quant.artifact (its metadata carries the model config). Looped models are evaluated
with recurrence on, as trained. The result (JSON) is printed by rank 0 and written to --out.
"""
from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from pgolf.config import add_arguments as add_config_arguments
from pgolf.config import resolve, to_dict
from pgolf.eval.budget import EvalBudget
from pgolf.eval.config import EvalConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint (.pt: {'model_config', 'model'}) or quantized artifact")
    parser.add_argument("--val-files", default=None,
                        help="glob of validation shards [default: the run's (config.json beside PATH), else "
                             "data/datasets/fineweb10B_sp<V>/fineweb_val_*.bin]")
    parser.add_argument("--tokenizer-path", default=None,
                        help="SentencePiece model for byte counts [default: the run's, else "
                             "data/tokenizers/fineweb_<V>_bpe.model]")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu [default: auto]")
    parser.add_argument("--out", default=None, help="write the result JSON here (rank 0)")
    add_config_arguments(parser, EvalConfig, "evaluation (EvalConfig)")


def _is_checkpoint(path: Path) -> bool:
    """torch.save files are zip archives (or legacy pickles starting with 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        return fh.read(1) == b"\x80"


def load_model_source(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(model_config, state_dict, kind) of a checkpoint or an artifact."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pgolf eval: no such file {path}")
    if _is_checkpoint(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
            raise ValueError(f"pgolf eval: {path} is a torch file but not a checkpoint "
                             f"{{'model_config': dict, 'model': state_dict}}")
        return dict(ckpt["model_config"]), ckpt["model"], "checkpoint"
    try:
        from pgolf.quant.artifact import load_state_dict
    except ImportError as exc:
        raise RuntimeError(f"pgolf eval: {path} is not a checkpoint and pgolf.quant.artifact is unavailable") from exc
    state, info = load_state_dict(path, device="cpu")
    model_config = (info.get("meta") or {}).get("model_config")
    if not model_config:
        raise ValueError(f"pgolf eval: artifact {path} carries no model_config in its metadata")
    return dict(model_config), state, "artifact"


def run_train_config(path: str | Path) -> dict:
    """The train section of the run's config.json beside `path` (a run directory's final.pt or model.pgq), if any:
    its val_files and tokenizer_path are the defaults for scoring that run."""
    config = Path(path).parent / "config.json"
    return json.loads(config.read_text()).get("train", {}) if config.is_file() else {}


def main(args: argparse.Namespace) -> int:
    from pgolf.model import build_model
    from pgolf.data.loader import load_validation_tokens
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.eval.bpb import build_byte_tables
    from pgolf.eval.evaluate import evaluate
    from pgolf.train.distributed import init_distributed

    cfg = resolve(EvalConfig, args)
    info = init_distributed(args.device)
    # the contest clock covers loading too: the budget starts before the artifact is read
    budget = EvalBudget(cfg.time_budget_seconds, cfg.budget_margin_seconds, device=info.device)
    with budget.phase("load"):
        model_config, state, kind = load_model_source(args.path)
        model = build_model(model_config, state, info.device)
        vocab = model.cfg.vocab_size
        run_train = run_train_config(args.path)
        val_files = (args.val_files or run_train.get("val_files")
                     or f"data/datasets/fineweb10B_sp{vocab}/fineweb_val_*.bin")
        tokenizer_path = (args.tokenizer_path or run_train.get("tokenizer_path")
                          or f"data/tokenizers/fineweb_{vocab}_bpe.model")
        tables = build_byte_tables(load_tokenizer(tokenizer_path), vocab, device=info.device)
        tokens = load_validation_tokens(val_files, vocab)
    result = evaluate(model, tokens, tables, cfg, budget=budget)
    result.update(source=str(args.path), kind=kind, world_size=info.world_size, config=to_dict(cfg))
    if info.is_main:
        text = json.dumps(result, indent=2, sort_keys=True, default=str)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    return 0
