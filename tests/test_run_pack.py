"""The main job end to end on the bundled sample, then the packer and the packed script from its own folder."""
import json
import os
import subprocess
import sys

import pytest

from pgolf.cli import main as cli_main
from pgolf.pack.packer import ARTIFACT_LIMIT, PackError, latin1_literal, minify, pack

FAST = ["--set", "train.max_wallclock_seconds=3", "--set", "train.reserve_seconds=0", "--set", "eval.max_tokens=4096",
        "--set", "train.val_tokens=4096", "--set", "quant.calib_batches=2"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "quick"
    with pytest.raises(SystemExit) as exc:
        cli_main(["run", "--out", str(out), *FAST])
    assert exc.value.code == 0
    return out


@pytest.mark.slow
def test_main_job_writes_a_scored_artifact(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    assert (quick_run / "model.pgq").stat().st_size == results["model_bytes"]
    assert results["total_bytes"] == results["model_bytes"] + results["code_bytes"] < ARTIFACT_LIMIT
    assert 0.5 < results["val_bpb"] < 8.0
    assert results["eval"]["tokens"] == 4095
    # quantization costs little on this model; a broken round trip would cost whole bits
    assert abs(results["val_bpb"] - results["val_bpb_prequant"]) < 0.1
    config = json.loads((quick_run / "config.json").read_text())
    assert {"model", "train", "optim", "quant", "eval"} <= set(config)


@pytest.mark.slow
def test_run_directory_becomes_a_runs_table_row(quick_run, tmp_path):
    from pgolf.bench.report import render
    from pgolf.bench.runs import add_run, run_row

    results = json.loads((quick_run / "results.json").read_text())
    row = run_row(quick_run, note="cpu smoke")
    assert row["command"].startswith("pgolf ") and "run --out" in row["command"]
    assert row["steps"] == results["steps"] and row["total_bytes"] == results["total_bytes"]
    assert row["val_bpb"] == round(results["val_bpb"], 4) and row["device"] == "cpu"
    assert row["launch_to_first_step_s"] > 0 and "4,095 val targets" in row["postquant_eval"]
    path = add_run(quick_run, "cpu smoke", directory=tmp_path)
    add_run(quick_run, "again", directory=tmp_path)  # the same run recorded twice keeps one row
    assert [r["note"] for r in json.loads(path.read_text())] == ["again"]
    table = render(tmp_path)
    assert "cpu smoke" not in table and "again" in table and row["command"] in table


@pytest.mark.slow
def test_eval_of_a_run_artifact_defaults_to_the_runs_evaluator(quick_run, tmp_path):
    """`pgolf eval RUN/model.pgq` with no flags scores what the run scored; a flag still overrides."""
    results = json.loads((quick_run / "results.json").read_text())
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exc:
        cli_main(["eval", str(quick_run / "model.pgq"), "--device", "cpu", "--out", str(out)])
    assert exc.value.code == 0
    again = json.loads(out.read_text())
    run_eval = json.loads((quick_run / "config.json").read_text())["eval"]
    assert again["config"]["mode"] == run_eval["mode"] and again["tokens"] == results["eval"]["tokens"] == 4095
    assert again["val_bpb"] == pytest.approx(results["val_bpb"], abs=1e-9)
    with pytest.raises(SystemExit):
        cli_main(["eval", str(quick_run / "model.pgq"), "--device", "cpu", "--max-tokens", "2048", "--out", str(out)])
    assert json.loads(out.read_text())["tokens"] == 2047


@pytest.mark.slow
def test_a_later_ttt_eval_joins_the_runs_row(quick_run, tmp_path):
    """`pgolf eval RUN/model.pgq --mode ttt --out RUN/eval_ttt.json` adds the after-TTT score to the run's row;
    a non-TTT eval file beside it does not."""
    import shutil

    from pgolf.bench.runs import run_row

    run = tmp_path / "quick"
    shutil.copytree(quick_run, run)
    assert "val_bpb_ttt" not in run_row(run)  # the quick job scores with sliding windows
    for mode in ("ttt", "chunks"):
        with pytest.raises(SystemExit):
            cli_main(["eval", str(run / "model.pgq"), "--device", "cpu", "--mode", mode, "--max-tokens", "2048",
                      "--ttt-chunk-tokens", "1024", "--out", str(run / f"eval_{mode}.json")])
    ttt = json.loads((run / "eval_ttt.json").read_text())
    row = run_row(run)
    assert row["val_bpb_ttt"] == round(ttt["val_bpb"], 4)
    assert row["ttt_eval"].startswith("ttt on 2,047 val targets") and row["ttt_eval"].endswith("(eval_ttt.json)")


def test_add_run_names_what_is_missing(tmp_path):
    from pgolf.bench.runs import run_row

    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        run_row(tmp_path)


@pytest.mark.slow
def test_packed_script_runs_from_its_own_folder(quick_run, tmp_path):
    sub = tmp_path / "submission"
    sizes = pack(quick_run, sub)
    for name in ("train_gpt.py", "requirements.txt", "submission.json", "README.md", "metrics.jsonl"):
        assert (sub / name).is_file(), name
    submission = json.loads((sub / "submission.json").read_text())
    assert submission["bytes_total"] == sizes.total_bytes == sizes.code_bytes + sizes.model_bytes
    assert sizes.code_bytes == (sub / "train_gpt.py").stat().st_size
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT_DIR=str(tmp_path / "rerun"), MAX_WALLCLOCK_SECONDS="2", RESERVE_SECONDS="0", MAX_TOKENS="2048",
               VAL_TOKENS="2048", CALIB_BATCHES="2")
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=sub, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_bpb" in proc.stdout
    rerun = json.loads((tmp_path / "rerun" / "results.json").read_text())
    assert rerun["eval"]["tokens"] == 2047
    assert rerun["total_bytes"] < ARTIFACT_LIMIT
    # the run's budget counted the script exactly as `pgolf pack` wrote it
    assert json.loads((quick_run / "results.json").read_text())["code_bytes"] == sizes.code_bytes
    ascii_sizes = pack(quick_run, tmp_path / "ascii", encoding="base85")
    assert (tmp_path / "ascii" / "train_gpt.py").read_bytes().isascii()
    assert sizes.code_bytes < 0.85 * ascii_sizes.code_bytes  # latin-1 bytes instead of base85's 5 chars per 4 bytes


def test_latin1_literal_round_trips_every_byte(tmp_path):
    data = bytes(range(256)) * 3 + b"\x00123\\x41\r\n\"" + bytes(range(255, -1, -1))
    script = b"# -*- coding: latin-1 -*-\nX=" + latin1_literal(data).encode("latin-1") + b"\n"
    path = tmp_path / "lit.py"
    path.write_bytes(script)
    out = subprocess.run([sys.executable, "-c", f"import runpy,sys;sys.stdout.buffer.write("
                          f"runpy.run_path({str(path)!r})['X'].encode('latin-1'))"], capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data
    assert len(script) < 1.05 * len(data) + 40


def test_pack_refuses_over_the_limit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    (tmp_path / "results.json").write_text(json.dumps({"val_bpb": 1.0, "artifact": "model.pgq"}))
    with open(tmp_path / "model.pgq", "wb") as fh:
        fh.truncate(ARTIFACT_LIMIT)
    with pytest.raises(PackError, match="over the limit"):
        pack(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pack_names_a_missing_run_file(tmp_path):
    with pytest.raises(PackError, match="config.json"):
        pack(tmp_path)


def test_minify_keeps_behaviour():
    source = 'def f(x):\n    """doc"""\n    # comment\n    return x + 1\n'
    small = minify(source)
    assert "doc" not in small and "comment" not in small
    scope = {}
    exec(small, scope)
    assert scope["f"](2) == 3


@pytest.mark.slow
def test_a_halted_run_resumes_and_finishes_the_pipeline(tmp_path):
    """How a run longer than one session call goes: killed after a checkpoint, the same command with
    train.resume=auto continues the curve and then quantizes and evaluates."""
    out = tmp_path / "split"
    common = ["run", "--out", str(out), "--set", "train.max_wallclock_seconds=0", "--set", "train.iterations=8",
              "--set", "train.checkpoint_every=3", "--set", "train.warmup_steps=0", "--set", "eval.max_tokens=2048",
              "--set", "train.val_tokens=2048", "--set", "quant.calib_batches=2"]
    with pytest.raises(SystemExit) as exc:
        cli_main([*common, "--set", "train.halt_after_step=5"])
    assert exc.value.code == 0
    assert not (out / "results.json").exists() and not (out / "model.pgq").exists()
    with pytest.raises(SystemExit) as exc:
        cli_main([*common, "--set", "train.resume=auto"])
    assert exc.value.code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 8 and (out / "model.pgq").stat().st_size == results["model_bytes"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # one curve: the killed run's steps after its last checkpoint (4, 5) were dropped on resume and run again
    assert [r["step"] for r in records if r.get("kind") == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r.get("event") == "resume"] == [3]
