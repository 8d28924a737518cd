"""The artifact budget: the mixed-width search lands under it even when sizes respond weakly to the symbol budget,
and fixed widths over it fall back to per-tensor widths (or refuse, as configured)."""
from __future__ import annotations

import pytest
import torch

import pgolf.quant.artifact as artifact
from pgolf.quant.artifact import ArtifactTooLarge, export_state_dict, load_state_dict
from pgolf.quant.config import QuantConfig


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(4):
        sd[f"blocks.{i}.attn.qkv.weight"] = 0.02 * torch.randn(96, 64, generator=gen)
        sd[f"blocks.{i}.mlp.fc.weight"] = 0.02 * torch.randn(160, 64, generator=gen)
        sd[f"blocks.{i}.mlp.proj.weight"] = torch.randn(64, 160, generator=gen) * torch.linspace(0.005, 0.05, 160)
        sd[f"blocks.{i}.norm.weight"] = torch.ones(64)
    sd["tok_emb.weight"] = torch.randn(200, 64, generator=gen)
    return sd


def _cfg(**kw) -> QuantConfig:
    return QuantConfig(**{"calib_source": "none", "compressor": "zstd", "quant_min_numel": 1000, "lqer_rank": 0,
                          "code_bytes": 0, **kw})


def _size(sd, **kw) -> int:
    return export_state_dict(sd, {}, _cfg(report_only=True, **kw), device="cpu")[1]["model_bytes"]


def test_mixed_widths_land_under_the_budget_when_sizes_respond_weakly(monkeypatch):
    """A coder whose output moves only 30% as much as the size model predicts (plus a fixed cost): plain
    corrections by the slack would need many retries; the secant step lands within the budget in a few, and the
    slow compressor runs only to confirm what the rANS-sized search found."""
    sd = _state()
    lo, hi = _size(sd, mixed_bits=True, bits_choices="4", attn_bits=4, mlp_bits=4, embed_bits=4), \
        _size(sd, mixed_bits=True, bits_choices="8", attn_bits=8, mlp_bits=8, embed_bits=8)
    build_blob, calls = artifact.build_blob, []

    def weak_coder(qm, method):
        blob, report = build_blob(qm, method)
        calls.append(method)
        return blob[: int(0.3 * len(blob))] + bytes(int(0.7 * (lo + hi) / 2)), report

    monkeypatch.setattr(artifact, "build_blob", weak_coder)
    budget = int(0.3 * (lo + 0.5 * (hi - lo)) + 0.7 * (lo + hi) / 2)
    qm, report = export_state_dict(sd, {}, _cfg(mixed_bits=True, bits_choices="4,5,6,7,8",
                                                artifact_budget_bytes=budget), device="cpu")
    assert report["model_bytes"] <= budget
    assert report["model_bytes"] >= 0.97 * budget  # used, not wasted
    assert calls.count("zstd") <= 4  # the search sizes with rANS and compresses with zstd to confirm
    assert calls.count("rans") <= 7
    assert len({qt.bits for qt in qm.tensors.values()}) > 1


@pytest.mark.parametrize("compressor", ["zstd", "rans"])
def test_fixed_widths_over_the_budget_fall_back_to_per_tensor_widths(tmp_path, compressor, capsys):
    sd = _state(1)
    fixed = _size(sd, attn_bits=6, mlp_bits=6, embed_bits=6, compressor=compressor)
    budget = int(0.85 * fixed)
    cfg = _cfg(attn_bits=6, mlp_bits=6, embed_bits=6, artifact_budget_bytes=budget, compressor=compressor)
    path = tmp_path / "m.pgq"
    qm, report = export_state_dict(sd, {}, cfg, path=path, device="cpu")
    assert "quant.over_budget=mixed" in capsys.readouterr().out
    assert report["over_budget_fallback"] == {"fixed_model_bytes": fixed, "bits_choices": [4, 5, 6],
                                              "compressor": "rans"}
    assert report["model_bytes"] <= budget and path.stat().st_size == report["model_bytes"]
    assert {qt.bits for qt in qm.tensors.values()} <= {4, 5, 6}
    state, _ = load_state_dict(path)
    assert set(state) == set(sd)
    cosine = min(float(torch.nn.functional.cosine_similarity(state[n].float().flatten(), sd[n].flatten(), dim=0))
                 for n in qm.tensors)
    assert cosine > 0.85  # 4-bit codes (SDClip k 12: rms error ~0.5 std) at worst

    with pytest.raises(ArtifactTooLarge, match="nothing was written"):
        export_state_dict(sd, {}, cfg.replace(over_budget="error"), path=tmp_path / "x.pgq", device="cpu")
    assert not (tmp_path / "x.pgq").exists()
    with pytest.raises(ArtifactTooLarge):  # not even the narrowest widths fit
        export_state_dict(sd, {}, cfg.replace(artifact_budget_bytes=1000), path=tmp_path / "y.pgq", device="cpu")
    assert not (tmp_path / "y.pgq").exists()


def test_over_budget_setting_is_checked():
    with pytest.raises(ValueError, match="over_budget"):
        QuantConfig(over_budget="shrink")
