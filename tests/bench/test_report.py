"""Result rows, the merge into bench/results/<bench>.json and the Markdown rendering (no GPU needed)."""
import json

from pgolf.bench.harness import row, write_results
from pgolf.bench.report import render


def test_row_counts_rates_and_fractions():
    r = row("mlp", "pgolf", "8x8", 2.0, flops=4e12, ceilings={"tflops": 800.0, "gbps": 3000.0})
    assert r["tflops"] == 2000.0 and r["frac_ceiling"] == 2.5
    b = row("copy", "pgolf", "1GB", 1.0, nbytes=3e9, ceilings={"tflops": 800.0, "gbps": 3000.0})
    assert b["gbps"] == 3000.0 and b["frac_ceiling"] == 1.0
    for key in ("device", "torch", "triton", "commit", "date"):
        assert key in r


def test_write_results_replaces_same_key_and_keeps_others(tmp_path):
    write_results("mlp", [row("mlp", "pgolf", "a", 1.0), row("mlp", "eager", "a", 3.0)], tmp_path)
    write_results("mlp", [row("mlp", "pgolf", "a", 0.5)], tmp_path)
    rows = json.loads((tmp_path / "mlp.json").read_text())
    assert sorted((r["impl"], r["median_ms"]) for r in rows) == [("eager", 3.0), ("pgolf", 0.5)]
    text = render(tmp_path)
    assert "## mlp" in text and "| 6.0 |" in text  # eager is 6x slower than pgolf's 0.5 ms


def test_runs_table_rendered(tmp_path):
    (tmp_path / "runs.json").write_text(json.dumps([{"preset": "pr1855", "train_seconds": 100, "steps": 88,
                                                     "val_bpb": 2.19, "command": "pgolf run --preset pr1855",
                                                     "device": "H100", "date": "2026-11-24", "commit": "abc"}]))
    text = render(tmp_path)
    assert "## Training runs" in text and "pgolf run --preset pr1855" in text and "| 88 |" in text


def test_rows_of_several_runs_show_their_commits(tmp_path):
    base = {"bench": "train_step", "shape": "s", "device": "H100", "torch": "t", "triton": "t"}
    rows = [dict(base, impl="pgolf", median_ms=1.0, commit="aaa", date="2026-11-25"),
            dict(base, impl="compile", median_ms=2.0, commit="bbb", date="2026-11-25")]
    (tmp_path / "train_step.json").write_text(json.dumps(rows))
    text = render(tmp_path)
    assert "| commit | date |" in text and "| aaa | 2026-11-25 |" in text and "| bbb | 2026-11-25 |" in text
    rows[1]["commit"] = "aaa"
    (tmp_path / "train_step.json").write_text(json.dumps(rows))
    assert "| commit |" not in render(tmp_path)
