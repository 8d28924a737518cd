"""The main job: data -> train -> quantize -> compress -> evaluate the round-tripped model, end to end.

`pgolf run` with no arguments needs nothing but the installed package: it tokenizes the bundled Wikipedia sample
into contest shards (sp1024, the bundled tokenizer), trains a small record-style model for a couple of minutes,
quantizes it with GPTQ, compresses it into an artifact, evaluates the artifact's weights (sliding window) and
prints val_bpb and the artifact bytes. `--preset NAME` and `--data-dir`/`--tokenizer` run a published system
on real shards instead; every field of every concern is settable with `--set concern.field=value` or through
its environment variable. The run directory gets config.json (all concerns), metrics.jsonl, final.pt,
model.pgq (the artifact) and results.json; `pgolf pack RUN_DIR` turns it into a submission.
Under torchrun every rank trains and evaluates its share; rank 0 quantizes and writes the artifact.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from pgolf import config as pconfig

ARTIFACT_NAME = "model.pgq"

# The bundled quick job: a small model with the record's switches, sized for a CPU in a few minutes.
QUICK_MODEL = dict(vocab_size=1024, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, seq_len=256,
                   loop_start=1, loop_end=2, loop_count=2, parallel_from_layer=3, max_docs_per_row=0)
QUICK_TRAIN = dict(train_batch_tokens=4096, grad_accum_steps=1, max_wallclock_seconds=120.0, reserve_seconds=5.0,
                   warmup_steps=0, val_tokens=65_536, log_every=25, iterations=100_000, ema_decay=0.99)
QUICK_OPTIM = dict(muon_momentum_warmup_steps=50)
QUICK_QUANT = dict(quant_min_numel=4096, calib_batches=8, calib_seq_len=256, lqer_rank=2)
QUICK_EVAL = dict(mode="sliding", stride=128, batch=32, max_tokens=65_536)


def _classes() -> dict[str, type]:
    from pgolf.eval.config import EvalConfig
    from pgolf.model.config import ModelConfig
    from pgolf.quant.config import QuantConfig
    from pgolf.train.config import TrainConfig
    from pgolf.train.optim import OptimConfig

    return {"model": ModelConfig, "train": TrainConfig, "optim": OptimConfig, "quant": QuantConfig,
            "eval": EvalConfig}


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """['model.num_layers=4', ...] -> {'model': {'num_layers': '4'}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        concern, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"pgolf run: --set wants CONCERN.FIELD=VALUE, got {item!r}")
        out.setdefault(concern, {})[name] = value
    return out


def resolve_configs(base: dict[str, dict[str, Any]], sets: dict[str, dict[str, str]] | None = None,
                    env: dict[str, str] | None = None) -> dict[str, Any]:
    """Dataclass configs from `base` field values < environment < `sets` (strings parsed by field type)."""
    classes = _classes()
    unknown = set(base) - set(classes) - {"preset", "run"} | set(sets or {}) - set(classes)
    if unknown:
        raise SystemExit(f"pgolf run: unknown config concerns {sorted(unknown)}; known: {sorted(classes)}")
    out = {}
    for concern, cls in classes.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        given = base.get(concern, {})
        bad = sorted(set(given) - fields | set((sets or {}).get(concern, {})) - fields)
        if bad:
            raise SystemExit(f"pgolf run: {concern} has no fields {bad}")
        cfg = pconfig.from_env(cls, env=env, base=dataclasses.replace(cls(), **given))
        for name, text in (sets or {}).get(concern, {}).items():
            cfg = dataclasses.replace(cfg, **{name: pconfig.parse_field(cls, name, text)})
        out[concern] = cfg
    return out


def quick_base(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Configs of the bundled quick job; prepares the bundled sample's shards under out_dir/data once."""
    from pgolf.data.corpus import DataConfig, dataset_dir, prepare, sample_paths

    sample = sample_paths()
    data_root = out_dir / "data"
    folder = dataset_dir(data_root, sample.vocab_size)
    if not (folder / "manifest.json").is_file():
        prepare(DataConfig(input=(str(sample.train),), val_input=(str(sample.val),), out=str(data_root),
                           vocab_size=sample.vocab_size, tokenizer=str(sample.tokenizer), workers=1,
                           progress=False))
    train = dict(QUICK_TRAIN, train_files=str(folder / "fineweb_train_*.bin"),
                 val_files=str(folder / "fineweb_val_*.bin"), tokenizer_path=str(sample.tokenizer))
    return {"model": QUICK_MODEL, "train": train, "optim": QUICK_OPTIM, "quant": QUICK_QUANT, "eval": QUICK_EVAL}


def preset_base(name: str) -> dict[str, dict[str, Any]]:
    from pgolf.model.presets import CONCERNS, get_preset

    preset = get_preset(name)
    return {c: preset.overrides(c) for c in CONCERNS}


def quantize(model: torch.nn.Module, cfgs: dict[str, Any], out_dir: Path, code_bytes: int) -> dict:
    """Hessians (training batches or self-generated text), GPTQ, compression; writes out_dir/model.pgq."""
    from pgolf.quant.artifact import export_state_dict
    from pgolf.quant.hessian import calibrate

    q = dataclasses.replace(cfgs["quant"], code_bytes=code_bytes)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    hessians = calibrate(model, q, cfgs["train"].train_files, device)
    calib_s = time.perf_counter() - t0
    reserve = cfgs["train"].reserve_seconds
    if q.calib_source == "train" and calib_s > reserve:
        print(f"pgolf run: warning: calibration on training data took {calib_s:.1f} s, more than the "
              f"{reserve:.0f} s the trainer reserved inside its budget (train.reserve_seconds); the contest allows "
              f"training data only inside the 600 s window, so raise the reserve or use quant.calib_source=self",
              flush=True)
    meta = {"model_config": dataclasses.asdict(cfgs["model"])}
    _, report = export_state_dict(model.state_dict(), hessians, q, meta, out_dir / ARTIFACT_NAME, device)
    report["calibration_seconds"] = calib_s
    return report


def evaluate_artifact(cfgs: dict[str, Any], path: Path, device: torch.device) -> dict:
    """Load the artifact into a fresh model (what a contest evaluation would see) and score it."""
    from pgolf.data.loader import load_validation_tokens
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.eval.bpb import build_byte_tables
    from pgolf.eval.evaluate import evaluate
    from pgolf.model import build_model
    from pgolf.quant.artifact import load_state_dict

    state, info = load_state_dict(path, device="cpu")
    model = build_model(cfgs["model"], state, device)
    t = cfgs["train"]
    tables = build_byte_tables(load_tokenizer(t.tokenizer_path), cfgs["model"].vocab_size, device=device)
    tokens = load_validation_tokens(t.val_files, cfgs["model"].vocab_size)
    result = evaluate(model, tokens, tables, cfgs["eval"])
    result["artifact_load_seconds"] = info["load_seconds"]
    return result


def packed_code_bytes(config: dict[str, Any]) -> int:
    """Bytes of the train_gpt.py that `pgolf pack` would write for this configuration."""
    from pgolf.pack.packer import build_script

    return len(build_script(config))


def run_pipeline(cfgs: dict[str, Any], out_dir: str | Path, preset: str | None = None,
                 code_bytes: int | None = None) -> dict:
    """Train, quantize, compress, evaluate; returns (and writes) results.json. A run halted by halt_after_step
    stops after training (returns its stop reason and step); `train.resume=auto` continues it.

    `code_bytes`: size of the submitted script; by default that of the script `pgolf pack` would write.
    """
    from pgolf.train import distributed as pdist
    from pgolf.train.trainer import Trainer

    out_dir = Path(out_dir)
    t = dataclasses.replace(cfgs["train"], out_dir=str(out_dir))
    cfgs = {**cfgs, "train": t}
    trainer = Trainer(cfgs["model"], t, cfgs["optim"], quant_cfg=cfgs["quant"])
    info = trainer.info
    train_result = trainer.run()
    if train_result.stop_reason == "halt":  # a simulated kill: nothing after training happens, as after a real one
        if info.is_main:
            print(f"pgolf run: training halted at step {train_result.step} (halt_after_step); nothing quantized or "
                  f"evaluated. Continue with the same command and --set train.resume=auto", flush=True)
        return {"stop_reason": "halt", "steps": train_result.step}
    quant_report = None
    if info.is_main:
        config = json.loads((out_dir / "config.json").read_text())
        config.update(preset=preset, quant=pconfig.to_dict(cfgs["quant"]), eval=pconfig.to_dict(cfgs["eval"]))
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if code_bytes is None:
            code_bytes = packed_code_bytes(config)
        quant_report = quantize(trainer.model, cfgs, out_dir, code_bytes)
    pdist.barrier()
    quant_report = pdist.broadcast_object(quant_report)
    eval_result = evaluate_artifact(cfgs, out_dir / ARTIFACT_NAME, info.device)
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()] \
        if info.is_main else []
    ms = [m["ms_per_step"] for m in metrics if m.get("kind") == "train" and "ms_per_step" in m]
    results = {
        "val_bpb": eval_result["val_bpb"], "val_loss": eval_result["val_loss"],
        "val_bpb_prequant": train_result.val_bpb, "val_loss_prequant": train_result.val_loss,
        "prequant_eval": f"trainer: disjoint windows of seq_len, {t.val_tokens or 'all'} val tokens, exported weights",
        "eval": eval_result, "steps": train_result.step, "train_seconds": train_result.elapsed_s,
        "ms_per_step": ms[-1] if ms else None, "seed": t.seed, "artifact": ARTIFACT_NAME,
        "model_bytes": quant_report["model_bytes"], "code_bytes": quant_report["code_bytes"],
        "total_bytes": quant_report["total_bytes"], "quant_seconds": quant_report["quant"]["seconds"],
        "calibration_seconds": quant_report["calibration_seconds"], "preset": preset,
        "quant_over_budget_fallback": quant_report.get("over_budget_fallback"),
    }
    if info.is_main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        e, before = cfgs["eval"], results["val_bpb_prequant"]
        same_measure = e.mode == "chunks" and e.max_tokens == 0 and t.val_tokens == 0 and before is not None
        prior = (f"before quantization {before:.4f} on the same tokens, gap {results['val_bpb'] - before:+.4f}"
                 if same_measure else f"before quantization {before or float('nan'):.4f} by the trainer's "
                 f"disjoint windows over {'all' if not t.val_tokens else f'{t.val_tokens:,}'} val tokens")
        print(f"\nval_bpb {results['val_bpb']:.4f} ({e.mode}, quantized artifact; {prior})\n"
              f"artifact {results['model_bytes']:,} model + {results['code_bytes']:,} code = "
              f"{results['total_bytes']:,} bytes (limit 16,000,000)\nrun directory: {out_dir}", flush=True)
    return results


def run_from_config(config: dict[str, Any], out_dir: str | Path, code_bytes: int | None = None) -> dict:
    """Rerun a recorded configuration (config.json of a run; what a packed train_gpt.py calls)."""
    from pgolf.train import distributed as pdist

    try:
        return run_pipeline(resolve_configs(config), out_dir, preset=config.get("preset"), code_bytes=code_bytes)
    finally:
        pdist.destroy()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="a published system (pgolf train --list-presets); "
                                                       "default: the bundled quick job")
    parser.add_argument("--data-dir", default=None, help="folder of fineweb_train_*.bin / fineweb_val_*.bin "
                                                         "(default with --preset: data/datasets/fineweb10B_sp<V>)")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece .model of the shards")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<preset or quickstart>)")
    parser.add_argument("--set", action="append", default=[], metavar="CONCERN.FIELD=VALUE",
                        help="override any field, e.g. --set model.num_layers=4 --set train.max_wallclock_seconds=60")


def main(args: argparse.Namespace) -> int:
    from pgolf.train import distributed as pdist

    out_dir = Path(args.out or f"runs/{args.preset or 'quickstart'}")
    if args.preset:
        base = preset_base(args.preset)
        vocab = base["model"]["vocab_size"]
        data_dir = Path(args.data_dir or f"data/datasets/fineweb10B_sp{vocab}")
        base["train"] = dict(base["train"], train_files=str(data_dir / "fineweb_train_*.bin"),
                             val_files=str(data_dir / "fineweb_val_*.bin"),
                             tokenizer_path=args.tokenizer or f"data/tokenizers/fineweb_{vocab}_bpe.model")
    else:
        base = quick_base(out_dir)
    try:
        run_pipeline(resolve_configs(base, parse_sets(args.set)), out_dir, preset=args.preset)
    finally:
        pdist.destroy()
    return 0
