"""The training loop on CPU with a tiny model on shards of the bundled sample.

Also holds the helpers the other trainer tests import (tiny configs, sample shards, reading losses).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf import BOS_ID
from pgolf.model import GPT, ModelConfig
from pgolf.train.checkpoint import CHECKPOINT_DIR, find_checkpoint, load_checkpoint, load_final, read_meta
from pgolf.train.config import TrainConfig
from pgolf.train.metrics import read_metrics
from pgolf.train.optim import OptimConfig
from pgolf.train.trainer import Trainer, TrainingDiverged

SEQ_LEN = 64


def make_data(folder: Path) -> dict[str, str]:
    """Train shards (2) and a val shard from the bundled sample documents, with its sp1024 tokenizer."""
    from pgolf.data.corpus import iter_documents, sample_paths
    from pgolf.data.shards import write_shard
    from pgolf.data.tokenizer import load_tokenizer

    paths = sample_paths()
    sp = load_tokenizer(paths.tokenizer)
    docs = list(iter_documents(paths.val))[:90]

    def encode(texts):
        return np.concatenate([np.array([BOS_ID] + sp.encode(t), dtype=np.uint16) for t in texts])

    folder.mkdir(parents=True, exist_ok=True)
    train = encode(docs[:60])
    write_shard(folder / "fineweb_train_000000.bin", train[: len(train) // 2])
    write_shard(folder / "fineweb_train_000001.bin", train[len(train) // 2:])
    write_shard(folder / "fineweb_val_000000.bin", encode(docs[60:]))
    return {"train_files": str(folder / "fineweb_train_*.bin"), "val_files": str(folder / "fineweb_val_*.bin"),
            "tokenizer_path": str(paths.tokenizer)}


def tiny_model(**overrides) -> ModelConfig:
    base = dict(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                seq_len=SEQ_LEN, loop_count=1, parallel_from_layer=-1)
    return ModelConfig(**{**base, **overrides})


def tiny_train(data: dict, out_dir: Path, **overrides) -> TrainConfig:
    base = dict(train_batch_tokens=4 * SEQ_LEN, grad_accum_steps=2, iterations=6, max_wallclock_seconds=0.0,
                warmup_steps=0, val_tokens=16 * SEQ_LEN, val_batch_tokens=8 * SEQ_LEN, log_every=1,
                out_dir=str(out_dir), device="cpu", compile="off", seed=7, **data)
    return TrainConfig(**{**base, **overrides})


def tiny_optim(**overrides) -> OptimConfig:
    return OptimConfig(**{"muon_momentum_warmup_steps": 3, **overrides})


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def run(data: dict, out_dir: Path, model: ModelConfig | None = None, optim: OptimConfig | None = None, **train):
    return Trainer(model or tiny_model(), tiny_train(data, out_dir, **train), optim or tiny_optim()).run()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_data(tmp_path_factory.mktemp("shards"))


def _independent_val(final: dict, data: dict, val_tokens: int) -> tuple[float, float, int]:
    """val_loss/val_bpb of final.pt's weights, computed here in one batch (no trainer code)."""
    from pgolf.data.loader import load_validation_tokens
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.eval.bpb import build_byte_tables, token_bytes

    model = GPT(ModelConfig(**final["model_config"]))
    model.load_state_dict(final["model"])
    if final["recurrence_active"]:
        model.set_recurrence(True)
    model.eval()
    tokens = load_validation_tokens(data["val_files"], 1024, SEQ_LEN)
    n = val_tokens // SEQ_LEN
    stream = torch.from_numpy(tokens[: n * SEQ_LEN + 1].astype(np.int64))
    x, y = stream[:-1].view(n, SEQ_LEN), stream[1:].view(n, SEQ_LEN)
    with torch.no_grad():
        nll = model(x, y, reduction="none").double()
    nbytes = token_bytes(x, y, build_byte_tables(load_tokenizer(data["tokenizer_path"]), 1024)).double()
    return float(nll.mean()), float(nll.sum() / math.log(2) / nbytes.sum()), y.numel()


def test_run_exports_final_metrics_and_config(data, tmp_path):
    out = tmp_path / "run"
    model = tiny_model(num_layers=3, loop_start=1, loop_end=1, loop_count=2, loop_enable_frac=0.5)
    result = run(data, out, model=model, iterations=4, val_every=2, checkpoint_every=0)
    assert result.stop_reason == "iterations" and result.step == 4 and result.weights == "ema"

    final = load_final(out / "final.pt")
    assert {"model_config", "model", "train_config"} <= set(final)
    assert final["model_config"]["num_layers"] == 3 and final["train_config"]["iterations"] == 4
    assert final["step"] == 4 and final["weights"] == "ema" and final["recurrence_active"]
    rebuilt = GPT(ModelConfig(**final["model_config"]))
    rebuilt.load_state_dict(final["model"])                     # every key, every shape

    # The exported weights are the EMA, not the raw weights of the resumable checkpoint.
    shared, _ = load_checkpoint(out / CHECKPOINT_DIR)
    ema = shared["averager"]["ema"]["shadow"]
    for k, v in final["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ema[k].to(v.dtype))
    assert any(not torch.equal(final["model"][k], shared["model"][k]) for k in ema)

    # Exact val_bpb of the exported weights, recomputed without the trainer.
    loss, bpb, n = _independent_val(final, data, 16 * SEQ_LEN)
    assert math.isclose(final["val_bpb"], bpb, rel_tol=1e-6) and math.isclose(final["val_loss"], loss, rel_tol=1e-6)

    records = read_metrics(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in train)
    # recurrence switches on at 50% of 4 steps: before step 3
    assert [r["recurrence"] for r in train] == [False, False, True, True]
    assert [r["step"] for r in records if r.get("event") == "recurrence_on"] == [2]
    vals = [r for r in records if r["kind"] == "val"]
    assert [(r["step"], r["weights"], r["val_tokens"]) for r in vals] == [(2, "raw", n), (4, "ema", n)]
    (fin,) = [r for r in records if r["kind"] == "final"]
    assert fin["val_bpb"] == final["val_bpb"] and fin["stop_reason"] == "iterations"
    assert fin["ms_per_step_loop_off"] > 0 and fin["tokens_per_s_loop_on"] > 0

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["iterations"] == 4 and cfg["model"]["loop_count"] == 2
    assert cfg["optim"]["muon_momentum_warmup_steps"] == 3 and cfg["run"]["grad_accum_steps"] == 2

    from pgolf.train.plot import plot_runs
    png = plot_runs([str(out)], tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_warmup_leaves_the_timed_run_unchanged(data, tmp_path):
    model = tiny_model(num_layers=3, loop_start=1, loop_end=1, loop_count=2, loop_enable_frac=0.5)
    run(data, tmp_path / "cold", model=model, iterations=3, final_val=False)
    run(data, tmp_path / "warm", model=model, iterations=3, final_val=False, warmup_steps=2)
    assert losses(tmp_path / "cold") == losses(tmp_path / "warm")
    cold, warm = load_final(tmp_path / "cold/final.pt"), load_final(tmp_path / "warm/final.pt")
    for k, v in cold["model"].items():
        assert torch.equal(v, warm["model"][k]), k
    events = [r for r in read_metrics(tmp_path / "warm") if r.get("event") == "warmup"]
    assert events and events[0]["steps"] == 4                   # 2 without and 2 with recurrence


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(data, tmp_path):
    out = tmp_path / "nan"
    trainer = Trainer(tiny_model(), tiny_train(data, out, checkpoint_every=2, iterations=8), tiny_optim())
    calls = {"n": 0}
    model = trainer.model

    def poisoned(x, y):
        calls["n"] += 1
        loss = model(x, y)
        return loss * float("nan") if calls["n"] > 2 * 3 else loss   # 2 micro-steps per step: step 4 is NaN

    trainer.forward = poisoned
    with pytest.raises(TrainingDiverged, match=r"at step 4;.*last good checkpoint .*checkpoint \(step 2\)"):
        trainer.run()
    ckpt = find_checkpoint(out / CHECKPOINT_DIR)
    assert ckpt is not None and read_meta(ckpt)["step"] == 2
    shared, local = load_checkpoint(ckpt)
    assert shared["step"] == 2 and "loader" in local
    assert all(torch.isfinite(v).all() for v in shared["model"].values() if v.is_floating_point())
    assert not (out / "final.pt").exists()
    records = read_metrics(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert records[-1]["event"] == "diverged" and records[-1]["step"] == 4


def test_time_budget_stops_the_run(data, tmp_path):
    result = run(data, tmp_path / "clock", iterations=10**6, max_wallclock_seconds=1.0, reserve_seconds=0.0,
                 final_val=False, log_every=1000)
    assert result.stop_reason == "budget" and 1.0 <= result.elapsed_s < 5.0
    train = [r for r in read_metrics(tmp_path / "clock") if r["kind"] == "train"]
    assert train[-1]["lr_scale"] < 0.5                          # the warmdown ran on the clock


def test_cli_precedence_preset_env_flags():
    from pgolf.train import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "baseline", "--iterations", "7", "--model-dim", "64"])
    cfgs = cli.build_configs(args, env={"WARMDOWN_FRAC": "0.5", "ITERATIONS": "99"})
    assert cfgs["model"].num_layers == 9 and cfgs["model"].vocab_size == 1024    # preset
    assert cfgs["model"].model_dim == 64 and cfgs["train"].iterations == 7        # flags beat env and preset
    assert cfgs["train"].warmdown_frac == 0.5                                     # env beats preset (0.2)
    assert cfgs["optim"].ns_schedule == "classic"
    with pytest.raises(SystemExit, match="unknown preset"):
        cli.build_configs(parser.parse_args(["--preset", "no-such-preset"]), env={})


def test_qat_switches_on_at_its_fraction_and_trains_through_the_fake_quantizer(data, tmp_path):
    from pgolf.quant.config import QuantConfig

    plain = tmp_path / "plain"
    run(data, plain)
    qat_dir = tmp_path / "qat"
    cfg = QuantConfig(qat=True, qat_start_frac=0.5, quant_min_numel=512)
    Trainer(tiny_model(), tiny_train(data, qat_dir), tiny_optim(), quant_cfg=cfg).run()
    events = [r for r in read_metrics(qat_dir) if r["kind"] == "event" and r.get("event") == "qat_on"]
    assert [e["step"] for e in events] == [3]                     # progress 3/6 = 0.5
    before, after = losses(plain), losses(qat_dir)
    assert all(before[s] == after[s] for s in (1, 2, 3))          # identical until QAT is on
    assert all(math.isfinite(after[s]) and after[s] != before[s] for s in (4, 5, 6))
    warmed = tmp_path / "qat_warm"  # the warm-up also runs the QAT graph, then restores every state
    Trainer(tiny_model(), tiny_train(data, warmed, warmup_steps=2), tiny_optim(), quant_cfg=cfg).run()
    assert losses(warmed) == after


def test_regional_compilation_trains_like_eager(data, tmp_path, monkeypatch):
    """compile_scope='blocks' (aot_eager here: no C++ toolchain needed) follows the eager loss curve, and the
    final validation runs the eager blocks. The CPU reference attention branches on document lengths, so the
    blocks do not compile as one graph: this also takes the trainer's fall-back to graph breaks."""
    import functools

    monkeypatch.setattr(GPT, "compile_blocks", functools.partialmethod(GPT.compile_blocks, backend="aot_eager"))
    model = tiny_model(max_docs_per_row=16)
    short = dict(iterations=2, grad_accum_steps=1, val_tokens=4 * SEQ_LEN)
    eager = run(data, tmp_path / "eager", model=model, **short)
    from pgolf.kernels import dispatch

    monkeypatch.setattr(dispatch, "_SAID", set())  # the fall-back message is said once per process
    with pytest.warns(RuntimeWarning, match="does not compile as one graph"):
        blocks = run(data, tmp_path / "blocks", model=model, compile="on", compile_scope="blocks", **short)
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "blocks")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert blocks.val_bpb == pytest.approx(eager.val_bpb, abs=1e-4)
