"""`pgolf eval CHECKPOINT_OR_ARTIFACT`: val_bpb of a trained checkpoint or a quantized artifact.

    pgolf eval runs/x/final.pt --mode sliding --stride 64
    torchrun --nproc_per_node=8 -m pgolf eval runs/x/model.pgq --mode lora_ttt --phases 3
    pgolf eval runs/x/model.pgq --table chunks,sliding:64,sliding:32,ttt,lora_ttt --bench-results

--table scores the same weights under each listed mode (`mode[:stride]`) and reports val_bpb and seconds per
mode, with the time projected to 8 GPUs; --bench-results also merges those rows into bench/results/eval_modes.json.

A checkpoint is a torch.save of {"model_config": dict, "model": state_dict}; anything else is read as an
artifact through pgolf.quant.artifact (its metadata carries the model config). Looped models are evaluated
with recurrence on, as trained. The result (JSON) is printed by rank 0 and written to --out.

Inside a run directory (config.json beside the file) the run's own settings are the defaults: its evaluator
(mode, stride, TTT settings, max_tokens...), val files and tokenizer; flags and PGOLF_* variables override them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from pgolf.config import add_arguments as add_config_arguments
from pgolf.config import resolve, to_dict
from pgolf.eval.budget import EvalBudget
from pgolf.eval.config import MODES, EvalConfig


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
    parser.add_argument("--table", default=None,
                        help="comma list of mode[:stride] (e.g. chunks,sliding:64,sliding:32,ttt,lora_ttt): score "
                             "under each and report a table instead of one result")
    parser.add_argument("--bench-results", action="store_true",
                        help="with --table: merge its rows into bench/results/eval_modes.json")
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


CONTEST_GPUS = 8


def parse_table(spec: str, base: EvalConfig) -> list[tuple[str, EvalConfig]]:
    """`chunks,sliding:64,ttt` -> [(label, config)], each config `base` with that mode (and stride)."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        mode, _, stride = item.partition(":")
        if mode not in MODES:
            raise ValueError(f"pgolf eval --table: unknown mode {mode!r} in {spec!r}; choose from {MODES}")
        if stride and not stride.isdigit():
            raise ValueError(f"pgolf eval --table: stride must be a positive integer, got {item!r}")
        cfg = dataclasses.replace(base, mode=mode, stride=int(stride) if stride else base.stride)
        out.append((item, cfg))
    if not out:
        raise ValueError("pgolf eval --table: no modes given")
    return out


def table_row(label: str, result: dict, world_size: int, source: str) -> dict:
    """A bench/results row for one mode: its seconds on this many ranks and projected to the contest's 8 GPUs
    (the scoring and TTT phases split across ranks, so linear scaling of the timed phases)."""
    from pgolf.bench.harness import row

    seconds = float(result["seconds_total"])
    return row("eval_modes", "pgolf", f"{label} ({result['tokens']:,} targets, {Path(source).name})",
               seconds * 1e3, val_bpb=round(result["val_bpb"], 5), val_loss=round(result["val_loss"], 5),
               seconds=round(seconds, 2), ranks=world_size,
               projected_8gpu_s=round(seconds * world_size / CONTEST_GPUS, 2), skipped=result["skipped"])


def run_config(path: str | Path, concern: str) -> dict:
    """One section of the run's config.json beside `path` (a run directory's final.pt or model.pgq), if any: the
    train section's val_files and tokenizer_path and the eval section (the run's evaluator, e.g. a preset's
    phased LoRA TTT) are the defaults for scoring that run."""
    config = Path(path).parent / "config.json"
    return json.loads(config.read_text()).get(concern, {}) if config.is_file() else {}


def run_eval_config(path: str | Path) -> EvalConfig:
    """The run's EvalConfig (fields it does not know, from another pgolf version, are ignored), else defaults."""
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in run_config(path, "eval").items() if k in known}
    return dataclasses.replace(EvalConfig(), **given)


def main(args: argparse.Namespace) -> int:
    from pgolf.model import build_model
    from pgolf.data.loader import load_validation_tokens
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.eval.bpb import build_byte_tables
    from pgolf.eval.evaluate import evaluate
    from pgolf.train.distributed import init_distributed

    cfg = resolve(EvalConfig, args, base=run_eval_config(args.path))
    info = init_distributed(args.device)
    # the contest clock covers loading too: the budget starts before the artifact is read
    budget = EvalBudget(cfg.time_budget_seconds, cfg.budget_margin_seconds, device=info.device)
    with budget.phase("load"):
        model_config, state, kind = load_model_source(args.path)
        model = build_model(model_config, state, info.device)
        vocab = model.cfg.vocab_size
        run_train = run_config(args.path, "train")
        val_files = (args.val_files or run_train.get("val_files")
                     or f"data/datasets/fineweb10B_sp{vocab}/fineweb_val_*.bin")
        tokenizer_path = (args.tokenizer_path or run_train.get("tokenizer_path")
                          or f"data/tokenizers/fineweb_{vocab}_bpe.model")
        tables = build_byte_tables(load_tokenizer(tokenizer_path), vocab, device=info.device)
        tokens = load_validation_tokens(val_files, vocab)
    if args.table:
        rows = []
        for label, mode_cfg in parse_table(args.table, cfg):
            result = evaluate(model, tokens, tables, mode_cfg)
            rows.append(table_row(label, result, info.world_size, args.path))
            if info.is_main:
                print(f"{label:12s} val_bpb {result['val_bpb']:.5f}  {result['seconds_total']:8.1f} s  "
                      f"(8 GPUs: {rows[-1]['projected_8gpu_s']:.1f} s)", flush=True)
        if info.is_main:
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
            if args.bench_results:
                from pgolf.bench.harness import write_results

                print(f"wrote {write_results('eval_modes', rows)}")
        return 0
    result = evaluate(model, tokens, tables, cfg, budget=budget)
    result.update(source=str(args.path), kind=kind, world_size=info.world_size, config=to_dict(cfg))
    if info.is_main:
        text = json.dumps(result, indent=2, sort_keys=True, default=str)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    return 0
