"""GPTQ driver: act-order round trip, dead columns, beats round-to-nearest, options, budget-driven choices."""
import math

import pytest
import torch

from pgolf.quant import clip
from pgolf.quant.config import QuantConfig
from pgolf.quant.gptq import dequantize, hessian_error, prepare_hessians, quantize_weights, select_weights


def _correlated_hessian(cols, rows=600, seed=0, dead=()):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, 4, generator=gen)
    x = base @ torch.randn(4, cols, generator=gen) + 0.3 * torch.randn(rows, cols, generator=gen)
    x = x * torch.exp(torch.randn(cols, generator=gen))
    x[:, list(dead)] = 0.0
    return x.T @ x / rows


def _cfg(**kw):
    return QuantConfig(**{"quant_min_numel": 0, "lqer_rank": 0, "gptq_block_size": 16, **kw})


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    h = _correlated_hessian(48)
    w = {"attn.weight": 0.02 * torch.randn(40, 48)}
    errs = {}
    for gptq in (False, True):
        qts, _ = quantize_weights(w, {"attn.weight": h}, _cfg(gptq=gptq, attn_bits=4, attn_clip_sigmas=5.0),
                                  device="cpu")
        errs[gptq] = hessian_error(w["attn.weight"], dequantize(qts["attn.weight"]), h)
    assert errs[True] < 0.7 * errs[False], errs


def test_act_order_round_trip_is_exact_for_a_diagonal_hessian():
    # With a diagonal H, GPTQ has no error feedback: act-order + inverse permutation must give RTN codes exactly.
    d = torch.rand(37) + 0.1
    w = {"x.weight": torch.randn(13, 37)}
    qts, _ = quantize_weights(w, {"x.weight": torch.diag(d)}, _cfg(gptq_act_order=True), device="cpu")
    s = clip.sdclip_scales(w["x.weight"], 6, 13.0)
    assert torch.equal(qts["x.weight"].q, clip.rtn(w["x.weight"], s, 31).to(torch.int8))
    p = prepare_hessians([torch.diag(d)])[0]
    assert not torch.equal(p.perm, torch.arange(37))
    assert torch.equal(torch.arange(37)[p.perm][torch.argsort(p.perm)], torch.arange(37))


def test_dead_columns_quantize_to_zero_without_nans():
    h = _correlated_hessian(24, dead=(2, 9))
    w = {"k.weight": torch.randn(10, 24)}
    qts, rep = quantize_weights(w, {"k.weight": h}, _cfg(), device="cpu")
    q = qts["k.weight"].q
    assert (q[:, [2, 9]] == 0).all() and math.isfinite(rep["tensors"]["k.weight"]["rel_error"])


def test_shared_hessians_are_prepared_once_and_missing_ones_round_to_nearest():
    h = _correlated_hessian(32)
    w = {"q.weight": torch.randn(8, 32), "k.weight": torch.randn(4, 32), "other.weight": torch.randn(5, 32)}
    qts, rep = quantize_weights(w, {"q.weight": h, "k.weight": h}, _cfg(), device="cpu")
    assert rep["distinct_hessians"] == 1
    s = clip.sdclip_scales(w["other.weight"], 6, 13.0)
    assert torch.equal(qts["other.weight"].q, clip.rtn(w["other.weight"], s, 31).to(torch.int8))


@pytest.mark.parametrize("opts", [dict(hadamard=True), dict(awq=True), dict(awq=True, hadamard=True),
                                  dict(clip_mode="search"), dict(clip_mode="percentile"), dict(clip_mode="absmax")])
def test_options_give_sane_errors(opts):
    h = _correlated_hessian(64, seed=1)
    w = {"mlp.fc.weight": 0.02 * torch.randn(24, 64)}
    qts, rep = quantize_weights(w, {"mlp.fc.weight": h}, _cfg(**opts), device="cpu")
    assert 0 < rep["tensors"]["mlp.fc.weight"]["rel_error"] < 0.05
    qt = qts["mlp.fc.weight"]
    assert (qt.awq is not None) == bool(opts.get("awq"))
    assert (qt.hadamard_seed is not None) == bool(opts.get("hadamard"))


def test_lqer_on_top_k_reduces_error():
    h = _correlated_hessian(64, seed=2)
    w = {f"t{i}.weight": torch.randn(64, 64) for i in range(3)}
    cfg = _cfg(lqer_rank=4, lqer_top_k=2, lqer_group=16, attn_bits=3, attn_clip_sigmas=4.0)
    qts, rep = quantize_weights(w, {n: h for n in w}, cfg, device="cpu")
    with_lqer = [n for n, qt in qts.items() if qt.lqer is not None]
    assert len(with_lqer) == 2
    assert all(rep["tensors"][n]["lqer_gain"] > 0 for n in with_lqer)


def test_adaptive_clip_and_mixed_bits_follow_the_budget():
    gen = torch.Generator().manual_seed(3)
    w = {f"m{i}.weight": (i + 1) * 0.01 * torch.randn(64, 128, generator=gen) for i in range(4)}
    h = {n: _correlated_hessian(128, seed=i) for i, n in enumerate(w)}
    models = {n: clip.SizeModel(w[n], torch.diagonal(h[n])) for n in w}
    bits = {n: 6 for n in w}
    loose = sum(m.nbytes(6, 6.0) for m in models.values())
    tight = sum(m.nbytes(6, 20.0) for m in models.values())
    budget = 0.5 * (loose + tight)
    ks = clip.adaptive_clip_sigmas(models, bits, budget)
    assert all(6.0 <= k <= 24.0 for k in ks.values())
    assert sum(models[n].nbytes(6, ks[n]) for n in w) <= budget
    assert len({round(k, 3) for k in ks.values()}) > 1  # sensitivity spreads k
    chosen = clip.allocate_bits(models, {n: 13.0 for n in w}, [4, 5, 6, 7, 8], budget)
    assert sum(models[n].nbytes(chosen[n], 13.0) for n in w) <= budget
    assert set(chosen.values()) <= {4, 5, 6, 7, 8}
    qts, _ = quantize_weights(w, h, _cfg(clip_mode="adaptive", mixed_bits=True), symbol_budget=budget, device="cpu")
    assert {n: qt.bits for n, qt in qts.items()} == clip.allocate_bits(models, {n: 13.0 for n in w},
                                                                       [4, 5, 6, 7, 8], budget)


def test_select_weights_and_classes():
    cfg = QuantConfig(quant_min_numel=100)
    sd = {"tok_emb.weight": torch.zeros(50, 4), "blocks.0.mlp.fc.weight": torch.zeros(20, 10),
          "blocks.0.attn.q.weight": torch.zeros(10, 10), "norm.weight": torch.zeros(10),
          "ids": torch.zeros(20, 10, dtype=torch.long)}
    assert select_weights(sd, cfg) == ["tok_emb.weight", "blocks.0.mlp.fc.weight", "blocks.0.attn.q.weight"]
    assert [cfg.tensor_class(n) for n in select_weights(sd, cfg)] == ["embed", "mlp", "attn"]
    assert cfg.bits_for("tok_emb.weight") == 7 and cfg.clip_sigmas_for("blocks.0.mlp.fc.weight") == 12.0
    with pytest.raises(ValueError, match="clip_mode"):
        QuantConfig(clip_mode="nope")
