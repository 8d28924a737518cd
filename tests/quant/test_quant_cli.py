"""`pgolf quant` on a checkpoint file (no calibration model needed with --calib-source none)."""
import json

import pytest
import torch

from pgolf.cli import build_parser
from pgolf.quant import cli
from pgolf.quant.artifact import ArtifactTooLarge, load_state_dict

from ._toy import Toy


def test_quant_command_writes_a_loadable_artifact(tmp_path, capsys):
    torch.manual_seed(0)
    model = Toy()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model_config": {"vocab": 97, "d": 32}, "model": model.state_dict()}, ckpt)
    code = tmp_path / "train_gpt.py"
    code.write_text("print('hi')\n")
    out = tmp_path / "m.pgq"
    args = build_parser("quant").parse_args(["quant", str(ckpt), "--out", str(out), "--calib-source", "none",
                                             "--quant-min-numel", "1000", "--code-file", str(code),
                                             "--compressor", "rans", "--report", str(tmp_path / "r.json")])
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["code_bytes"] == code.stat().st_size and printed["total_bytes"] <= 16_000_000
    sd, info = load_state_dict(out)
    assert info["meta"]["model_config"] == {"vocab": 97, "d": 32}
    Toy().load_state_dict(sd)
    args = build_parser("quant").parse_args(["quant", str(ckpt), "--out", str(tmp_path / "x.pgq"),
                                             "--calib-source", "none", "--artifact-budget-bytes", "100"])
    with pytest.raises(ArtifactTooLarge):
        cli.main(args)
    assert not (tmp_path / "x.pgq").exists()
