"""Each switch of the blocks against a hand-written reference of its formula (model_refs.py)."""
import math

import pytest
import torch

from model_refs import (BOS, assert_close, docs_batch, perturb, ref_attention, ref_bigram_index, ref_embed, ref_mlp,
                        ref_rms, ref_rope, tiny_cfg)
from pgolf.kernels.attention import attention as kernel_attention
from pgolf.model import GPT
from pgolf.model.attention import Attention
from pgolf.model.embeddings import BigramHash, SmearGate, bigram_index
from pgolf.model.gpt import Block
from pgolf.model.layout import doc_cu_seqlens
from pgolf.model.mlp import MLP
from pgolf.model.rotary import Rotary, apply_rotary

B, T = 2, 13
STARTS = {0: [0, 5], 1: [3, 4, 9]}  # row 1 starts mid-document, has a one-token document at 3


def run_attention(attn, cfg, x, ids, ve=None, v0=None):
    rot = Rotary(cfg.head_dim, cfg.rope_dims, cfg.rope_base, cfg.seq_len, cfg.yarn_scale)
    cos, sin = rot.cos_sin(x.shape[1], x.device)
    cu = doc_cu_seqlens(ids, BOS, cfg.doc_mask, cfg.max_docs_per_row)
    return attn(x, cos, sin, cu, x.shape[1], ve, v0)


def make_attention(cfg, xsa=True, ve=False, vr=False, seed=0):
    attn = Attention(cfg, xsa=xsa, value_embed=ve, mixes_value_residual=vr)
    attn.reset_parameters(ortho=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        attn.w_o.copy_(torch.randn(attn.w_o.shape, generator=gen) / math.sqrt(cfg.model_dim))
        for p in (attn.q_gain, attn.gate_w, attn.vr_lambda, attn.ve_scale):
            if p is not None:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return attn


def test_rms_norm_and_ln_scale():
    cfg = tiny_cfg()
    x = torch.randn(B, T, cfg.model_dim) * 3
    block = Block(cfg, layer=3, xsa=True, value_embed=False, mixes_value_residual=False)
    assert_close(block._norm(x), ref_rms(x) / 2.0, 1e-5)  # 1/sqrt(3+1)
    flat = Block(tiny_cfg(ln_scale=False), layer=3, xsa=True, value_embed=False, mixes_value_residual=False)
    assert_close(flat._norm(x), ref_rms(x), 1e-5)


@pytest.mark.parametrize("rope_dims", [4, 0])
def test_partial_rope_rotates_only_first_dims(rope_dims):
    cfg = tiny_cfg(rope_dims=rope_dims)
    x = torch.randn(B, T, cfg.num_heads, cfg.head_dim)
    cos, sin = Rotary(cfg.head_dim, rope_dims, 500.0, T).cos_sin(T, x.device)
    y = apply_rotary(x, cos, sin)
    r = rope_dims or cfg.head_dim
    assert_close(y, ref_rope(x, r, 500.0), 1e-5)
    assert torch.equal(y[..., r:], x[..., r:])
    assert not torch.allclose(y[:, 1:, :, :r], x[:, 1:, :, :r])
    # relative positions: <R_t q, R_s k> depends on t - s only
    q, k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)
    rq = apply_rotary(q.expand(1, T, 1, -1), cos, sin)[0, :, 0]
    rk = apply_rotary(k.expand(1, T, 1, -1), cos, sin)[0, :, 0]
    assert abs(float(rq[7] @ rk[4] - rq[5] @ rk[2])) < 1e-4


def test_yarn_scales_the_base():
    r, base = 8, 10000.0
    x = torch.randn(1, 40, 2, 8)
    fixed = Rotary(8, r, base, train_seq_len=10, yarn_scale=4.0)
    assert_close(apply_rotary(x, *fixed.cos_sin(40, x.device)), ref_rope(x, r, base * 4 ** (r / (r - 2))), 1e-5)
    auto = Rotary(8, r, base, train_seq_len=10, yarn_scale=0.0)
    assert auto.scale_for(40) == 4.0 and auto.scale_for(8) == 1.0
    assert_close(apply_rotary(x, *auto.cos_sin(40, x.device)), ref_rope(x, r, base * 4 ** (r / (r - 2))), 1e-5)
    off = Rotary(8, r, base, train_seq_len=10)
    assert_close(apply_rotary(x, *off.cos_sin(40, x.device)), ref_rope(x, r, base), 1e-5)


@pytest.mark.parametrize("gate", ["none", "sparse", "dense"])
@pytest.mark.parametrize("xsa", [True, False])
def test_attention_matches_reference(gate, xsa):
    cfg = tiny_cfg(attn_out_gate=gate)
    attn = make_attention(cfg, xsa=xsa)
    x = torch.randn(B, T, cfg.model_dim, requires_grad=True)
    ids = docs_batch(B, T, cfg.vocab_size, STARTS)
    out, _ = run_attention(attn, cfg, x, ids)
    ref, _ = ref_attention(attn, x, ids, cfg)
    assert_close(out, ref)
    g_out, = torch.autograd.grad(out.square().sum(), x)
    g_ref, = torch.autograd.grad(ref.square().sum(), x)
    assert_close(g_out, g_ref)


@pytest.mark.parametrize("changes", [dict(qk_gain_init=0.0), dict(qk_norm=False), dict(rope_dims=0),
                                     dict(doc_mask=False), dict(max_docs_per_row=0), dict(max_docs_per_row=2)])
def test_attention_switch_variants(changes):
    cfg = tiny_cfg(**changes)
    attn = make_attention(cfg)
    x = torch.randn(B, T, cfg.model_dim)
    starts = {0: [0, 5], 1: [9]} if cfg.max_docs_per_row == 2 else STARTS  # row starts count as segments
    ids = docs_batch(B, T, cfg.vocab_size, starts)
    out, _ = run_attention(attn, cfg, x, ids)
    ref, _ = ref_attention(attn, x, ids, cfg, doc_mask=cfg.doc_mask)
    assert_close(out, ref)
    assert (attn.q_gain is None) == (cfg.qk_gain_init <= 0)


def test_qk_gain_zero_gives_uniform_causal_average():
    cfg = tiny_cfg(attn_out_gate="none")
    attn = make_attention(cfg, xsa=False)
    with torch.no_grad():
        attn.q_gain.zero_()
        attn.w_o.copy_(torch.eye(cfg.model_dim))
    x = torch.randn(1, T, cfg.model_dim)
    ids = docs_batch(1, T, cfg.vocab_size, {0: [0]})
    out, v = run_attention(attn, cfg, x, ids)
    v = v.view(1, T, cfg.num_kv_heads, cfg.head_dim)
    mean = v.cumsum(1) / torch.arange(1, T + 1)[None, :, None, None]
    group = cfg.num_heads // cfg.num_kv_heads
    assert_close(out.view(1, T, cfg.num_heads, cfg.head_dim), mean.repeat_interleave(group, dim=2), 1e-5)


def test_gqa_query_heads_read_their_kv_head():
    cfg = tiny_cfg(attn_out_gate="none")  # 4 query heads, 2 KV heads: heads 0,1 -> kv 0; heads 2,3 -> kv 1
    d = cfg.head_dim
    attn = make_attention(cfg, xsa=False)
    with torch.no_grad():
        attn.w_o.copy_(torch.eye(cfg.model_dim))
    x = torch.randn(1, T, cfg.model_dim)
    ids = docs_batch(1, T, cfg.vocab_size, {0: [0]})
    base, _ = run_attention(attn, cfg, x, ids)
    with torch.no_grad():
        attn.w_v[d:].mul_(-2.0)  # change only KV head 1's values
    moved, _ = run_attention(attn, cfg, x, ids)
    heads = lambda y: y.view(1, T, cfg.num_heads, d)  # noqa: E731
    assert torch.equal(heads(base)[:, :, :2], heads(moved)[:, :, :2])
    assert_close(heads(moved)[:, :, 2:], -2.0 * heads(base)[:, :, 2:], 1e-5)


def test_xsa_removes_the_own_value_direction():
    cfg = tiny_cfg(attn_out_gate="none")
    d, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    x = torch.randn(1, T, cfg.model_dim)
    ids = docs_batch(1, T, cfg.vocab_size, {0: [0]})
    outs = {}
    attn = make_attention(cfg, seed=3)
    with torch.no_grad():
        attn.w_o.copy_(torch.eye(cfg.model_dim))
    for xsa in (True, False):
        attn.xsa = xsa
        out, v = run_attention(attn, cfg, x, ids)
        outs[xsa] = out.view(1, T, cfg.num_heads, d)
    v = v.view(1, T, cfg.num_kv_heads, d).repeat_interleave(group, dim=2)
    vh = v / v.norm(dim=-1, keepdim=True)
    assert (outs[True] * vh).sum(-1).abs().max() < 1e-5
    expect = outs[False] - (outs[False] * vh).sum(-1, keepdim=True) * vh
    assert_close(outs[True], expect, 1e-5)


def test_attention_gates_formulas():
    x = torch.randn(B, T, 32)
    ids = docs_batch(B, T, 61, STARTS)
    plain_cfg = tiny_cfg(attn_out_gate="none")
    plain = make_attention(plain_cfg, xsa=False)
    with torch.no_grad():
        plain.w_o.copy_(torch.eye(32))
    y, _ = run_attention(plain, plain_cfg, x, ids)
    y = y.view(B, T, 4, 8)
    for gate, src in (("sparse", x[..., :5]), ("dense", x)):
        cfg = tiny_cfg(attn_out_gate=gate)
        attn = Attention(cfg, xsa=False, value_embed=False, mixes_value_residual=False)
        attn.reset_parameters(ortho=True)
        if gate == "sparse":
            assert torch.count_nonzero(attn.gate_w) == 0  # zero-init: every head at sigmoid(0) = 1/2
        else:
            assert 0 < attn.gate_w.std() < 0.05
        with torch.no_grad():
            for name in ("w_q", "w_k", "w_v", "q_gain"):
                getattr(attn, name).copy_(getattr(plain, name))
            attn.w_o.copy_(torch.eye(32))
            attn.gate_w.normal_()
        out, _ = run_attention(attn, cfg, x, ids)
        g = torch.sigmoid(src @ attn.gate_w.T)
        assert_close(out.view(B, T, 4, 8), y * g[..., None], 1e-5)


def test_value_residual_and_value_embedding():
    cfg = tiny_cfg(value_residual=True, value_embed_layers="2")
    attn = make_attention(cfg, ve=True, vr=True)
    x = torch.randn(B, T, cfg.model_dim)
    ids = docs_batch(B, T, cfg.vocab_size, STARTS)
    ve, v0 = torch.randn(B, T, cfg.kv_dim), torch.randn(B, T, cfg.kv_dim)
    out, own = run_attention(attn, cfg, x, ids, ve=ve, v0=v0)
    ref, ref_own = ref_attention(attn, x, ids, cfg, ve=ve, v0=v0)
    assert_close(out, ref)
    assert_close(own, x @ attn.w_v.T + attn.ve_scale * ve, 1e-5)  # own values carry the VE, not the mix
    plain, _ = run_attention(attn, cfg, x, ids)
    assert not torch.allclose(out, plain)
    fresh = Attention(cfg, xsa=True, value_embed=True, mixes_value_residual=True)
    fresh.reset_parameters(ortho=True)
    assert fresh.vr_lambda.tolist() == [0.5, 0.5] and fresh.ve_scale.item() == 1.0


def test_value_embedding_table_is_shared_across_layers():
    cfg = tiny_cfg(value_embed_layers="1,4")
    model = GPT(cfg)
    assert [b.attn.ve_scale is not None for b in model.blocks] == [False, True, False, False, True, False]
    ids = docs_batch(B, T, cfg.vocab_size, STARTS)
    vem = model.value_embed
    assert_close(vem(ids), vem.scale * (vem.embed.weight[ids] @ vem.proj.T), 1e-6)
    assert vem.proj.shape == (cfg.kv_dim, cfg.value_embed_dim)


@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_mlp_leaky_relu_square(slope):
    mlp = MLP(32, 80, slope)
    mlp.reset_parameters(ortho=True)
    assert torch.count_nonzero(mlp.w_down) == 0
    with torch.no_grad():
        mlp.w_down.normal_()
    x = torch.randn(B, T, 32)
    assert_close(mlp(x), ref_mlp(mlp, x, slope), 1e-5)
    h = x @ mlp.w_up.T
    assert_close(mlp(x), torch.relu(h).square() @ mlp.w_down.T if slope == 0 else ref_mlp(mlp, x, 0.5), 1e-5)


@pytest.mark.parametrize("cap", [30.0, 15.0, 0.0])
def test_softcap_logits_and_loss(cap):
    cfg = tiny_cfg(logit_softcap=cap, num_layers=2, loop_count=1, parallel_from_layer=-1)
    model = GPT(cfg)
    perturb(model)
    ids = docs_batch(B, T, cfg.vocab_size, STARTS)
    h = model.hidden(ids)
    z = h @ model.tok_emb.weight.T
    expect = cap * torch.tanh(z / cap) if cap > 0 else z
    logits = model(ids)
    assert logits.dtype == torch.float32 and logits.shape == (B, T, cfg.vocab_size)
    assert_close(logits, expect, 1e-5)
    if cap:
        assert logits.abs().max() < cap
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    targets[0, 2] = -100
    per_tok = torch.nn.functional.cross_entropy(expect.reshape(-1, cfg.vocab_size), targets.reshape(-1),
                                                reduction="none").view(B, T)
    assert_close(model(ids, targets, reduction="none"), per_tok, 1e-5)
    assert_close(model(ids, targets), per_tok.sum() / (targets != -100).sum(), 1e-5)


def test_smear_gate_formula_and_bos_mask():
    cfg = tiny_cfg(bigram_buckets=0)
    ids = docs_batch(B, T, cfg.vocab_size, STARTS)
    x = torch.randn(B, T, cfg.model_dim)
    masked, unmasked = SmearGate(5, BOS), SmearGate(5, None)
    for m in (masked, unmasked):
        m.reset_parameters()
        assert torch.equal(m(x, ids), x)  # identity at init
        with torch.no_grad():
            m.weight.copy_(torch.linspace(-1, 1, 5)[None])
            m.lam.fill_(0.7)
    out = masked(x, ids)
    for r in range(B):
        for c in range(T):
            if c == 0 or int(ids[r, c]) == BOS:
                expect = x[r, c]
            else:
                expect = x[r, c] + 0.7 * torch.sigmoid(x[r, c, :5] @ masked.weight[0]) * x[r, c - 1]
            assert_close(out[r, c], expect, 1e-6)
    leaky = unmasked(x, ids)
    bos = ids == BOS
    bos[:, 0] = False
    assert not torch.allclose(leaky[bos], x[bos])  # without the mask BOS reads the previous document
    assert torch.equal(leaky[~bos], out[~bos])


@pytest.mark.parametrize("bos_mask", [True, False])
def test_bigram_hash_indexing_and_bos_mask(bos_mask):
    ids = docs_batch(3, 17, 8192, {0: [0, 6], 1: [1, 2, 16], 2: [9]}, seed=5)
    for buckets in (3072, 2048, 7):
        idx = bigram_index(ids, buckets, BOS if bos_mask else None)
        assert torch.equal(idx, ref_bigram_index(ids, buckets, bos_mask))
        assert idx.min() >= 0 and idx.max() < buckets
    idx = bigram_index(ids, 3072, BOS if bos_mask else None)
    at_bos = (ids == BOS)
    at_bos[:, 0] = False
    assert bool((idx[at_bos] == 3071).all()) == bos_mask
    module = BigramHash(3072, 6, 32, BOS if bos_mask else None)
    module.reset_parameters(ortho=True)
    assert torch.count_nonzero(module(ids)) == 0  # zero-init table
    with torch.no_grad():
        module.embed.weight.normal_()
    expect = module.scale * (module.embed.weight[ref_bigram_index(ids, 3072, bos_mask)] @ module.proj.T)
    assert_close(module(ids), expect, 1e-6)


def test_input_embedding_path_matches_reference():
    cfg = tiny_cfg(bigram_buckets=37, bigram_dim=6)
    model = GPT(cfg)
    perturb(model)
    ids = docs_batch(B, T, cfg.vocab_size, STARTS)
    x = model.tok_emb(ids) + model.bigram(ids)
    x = model.smear(x, ids)
    assert_close(ref_rms(x), ref_embed(model, ids), 1e-5)


def test_kernel_attention_is_what_the_module_calls(monkeypatch):
    calls = []

    def spy(q, k, v, cu_seqlens, max_seqlen, xsa=True):
        calls.append((q.shape, k.shape, cu_seqlens.dtype, max_seqlen, xsa))
        return kernel_attention(q, k, v, cu_seqlens, max_seqlen, xsa)

    monkeypatch.setattr("pgolf.model.attention.attention", spy)
    cfg = tiny_cfg()
    attn = make_attention(cfg, xsa=False)
    run_attention(attn, cfg, torch.randn(B, T, cfg.model_dim), docs_batch(B, T, cfg.vocab_size, STARTS))
    assert calls == [((B * T, 4, 8), (B * T, 2, 8), torch.int32, T, False)]
