"""Artifact: bit-exact round trip, tied weights, every compressor, corruption, truncation, the size budget."""
import pytest
import torch

from pgolf.quant import compress as cz
from pgolf.quant.artifact import (ArtifactError, ArtifactTooLarge, build_blob, build_quantized_model, check_budget,
                                  compressor_table, export_state_dict, find_aliases, load_artifact, load_state_dict,
                                  parse_blob, save_artifact)
from pgolf.quant.config import QuantConfig
from pgolf.quant.gptq import quantize_weights, select_weights
from pgolf.quant.hessian import collect_hessians

from ._toy import Toy


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = Toy()
    hessians = collect_hessians(model, [torch.randint(0, 97, (2, 24)) for _ in range(2)])
    cfg = QuantConfig(quant_min_numel=500, lqer_top_k=2, lqer_group=16, awq=True, hadamard=True)
    sd = model.state_dict()
    names = [n for n in select_weights(sd, cfg) if n not in find_aliases(sd)]
    qts, _ = quantize_weights({n: sd[n] for n in names}, hessians, cfg, device="cpu")
    # one plain tensor without transforms next to the transformed ones
    cfg_plain = cfg.replace(awq=False, hadamard=False, lqer_rank=0)
    plain, _ = quantize_weights({names[0]: sd[names[0]]}, hessians, cfg_plain, device="cpu")
    qts[names[0]] = plain[names[0]]
    return model, build_quantized_model(sd, qts, cfg, {"model_config": {"d": 32}})


def _same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("compressor", ["best", "rans"] + [m for m in cz.METHODS if m in cz.available_methods()])
def test_round_trip_is_bit_exact(toy, compressor, tmp_path):
    model, qm = toy
    path = tmp_path / "model.pgq"
    report = save_artifact(qm, path, code_bytes=1234, compressor=compressor)
    assert report["total_bytes"] == path.stat().st_size + 1234
    loaded, info = load_artifact(path)
    assert info["load_seconds"] >= 0 and info["bytes"] == path.stat().st_size
    assert loaded.meta == {"model_config": {"d": 32}}
    for name, qt in qm.tensors.items():
        lt = loaded.tensors[name]
        assert torch.equal(qt.q, lt.q) and torch.equal(qt.scale, lt.scale) and qt.bits == lt.bits
    _same_state(qm.state_dict(), loaded.state_dict())
    sd, _ = load_state_dict(path)
    model.load_state_dict(sd)
    assert model.head.weight is model.emb.weight and "head.weight" in loaded.aliases
    assert loaded.small["calls"].dtype == torch.int64 and loaded.small["gain"].dtype == torch.float16


def test_best_is_no_larger_than_any_single_compressor(toy):
    _, qm = toy
    table = compressor_table(qm)
    assert table["best"] <= min(table[k] for k in ("zstd", "lzma", "brotli", "rans") if k in table)
    sym = build_blob(qm, "rans")[1]["streams"]["sym"]["stored"]
    assert table["codes_entropy_contexts_prev"] <= table["codes_entropy_contexts"] <= sym


def test_corrupted_and_truncated_artifacts_raise(toy):
    _, qm = toy
    blob, _ = build_blob(qm, "rans")
    with pytest.raises(ArtifactError, match="truncated"):
        parse_blob(blob[:-10])
    with pytest.raises(ArtifactError, match="truncated"):
        parse_blob(blob[:20])
    with pytest.raises(ArtifactError, match="magic"):
        parse_blob(b"XXXX" + blob[4:])
    for pos in (len(blob) // 2, len(blob) - 6, 40):
        broken = bytearray(blob)
        broken[pos] ^= 0x10
        with pytest.raises(ArtifactError, match="corrupted"):
            parse_blob(bytes(broken))
    with pytest.raises(ArtifactError, match="trailing"):
        parse_blob(blob + b"\0")


def test_over_budget_is_refused_before_writing(toy, tmp_path):
    _, qm = toy
    path = tmp_path / "big.pgq"
    with pytest.raises(ArtifactTooLarge, match="nothing was written"):
        save_artifact(qm, path, code_bytes=100, budget=1000)
    assert not path.exists()
    with pytest.warns(RuntimeWarning, match="too large"):
        report = save_artifact(qm, path, code_bytes=100, budget=1000, report_only=True)
    assert report["over_budget"] and path.exists()
    assert check_budget(15_999_000, 1000)["headroom_bytes"] == 0
    with pytest.raises(ArtifactTooLarge):
        check_budget(15_999_000, 1001)


def test_export_state_dict_meets_budget_with_adaptive_clip(tmp_path):
    torch.manual_seed(1)
    model = Toy(vocab=200, d=64)
    hessians = collect_hessians(model, [torch.randint(0, 200, (2, 32))])
    sd = model.state_dict()
    base = QuantConfig(quant_min_numel=1000, lqer_rank=0, compressor="rans")
    _, free = export_state_dict(sd, hessians, base)
    budget = int(free["model_bytes"] * 0.9)
    cfg = base.replace(clip_mode="adaptive", artifact_budget_bytes=budget)
    qm, report = export_state_dict(sd, hessians, cfg, path=tmp_path / "a.pgq")
    assert report["total_bytes"] <= budget and (tmp_path / "a.pgq").exists()
    _same_state(qm.state_dict(), load_artifact(tmp_path / "a.pgq")[0].state_dict())
