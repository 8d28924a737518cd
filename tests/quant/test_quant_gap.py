"""The gap table quantizes one model under every option and scores each against the unquantized model."""
import torch

from pgolf.quant.config import QuantConfig
from pgolf.quant.gap import OPTIONS, gap_rows
from pgolf.quant.hessian import collect_hessians

from ._toy import random_small_gpt, small_gpt_config

CFG = small_gpt_config(64)


def trained_stand_in():
    model = random_small_gpt(64, std=0.05)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, 64, (4, 16))
    ids[:, 0] = 1
    return state, collect_hessians(model, [ids])


def test_gap_rows_cover_every_option_and_score_the_dequantized_weights():
    state, hessians = trained_stand_in()

    def score(sd):  # the mean squared weight change against the trained model: 0 before quantization
        return sum(float((sd[k].float() - state[k].float()).pow(2).mean()) for k in state if state[k].dim() == 2)

    rows = gap_rows(CFG, state, hessians, QuantConfig(quant_min_numel=1024, calib_source="none"), score)
    assert [r["option"] for r in rows] == ["unquantized", *OPTIONS]
    assert rows[0]["gap_bpb"] == 0.0
    for r in rows[1:]:
        assert r["gap_bpb"] > 0 and r["model_bytes"] > 0
        assert abs(r["gap_bpb"] - (r["val_bpb"] - rows[0]["val_bpb"])) < 1e-12


def test_triton_and_eager_sweeps_give_the_same_integers(monkeypatch):
    monkeypatch.setenv("PGOLF_KERNELS", "triton")  # the Triton sweep (interpreted on CPU) beside the eager one
    state, hessians = trained_stand_in()
    options = {k: OPTIONS[k] for k in ("gptq sdclip", "gptq sdclip, eager sweep")}
    score = lambda sd: sum(float(v.float().abs().sum()) for v in sd.values())  # noqa: E731
    rows = gap_rows(CFG, state, hessians, QuantConfig(quant_min_numel=1024, calib_source="none"), score, options)
    assert rows[2]["same_ints"] >= 0.999  # differences only from rounding ties
    assert abs(rows[2]["val_bpb"] - rows[1]["val_bpb"]) <= 1e-3 * rows[1]["val_bpb"]
