"""The assembled GPT: document isolation, causality, parameter groups, record size, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from model_refs import assert_close, docs_batch, perturb, tiny_cfg
from pgolf.kernels.attention import xsa_reference
from pgolf.model import GPT, ModelConfig

B, T = 2, 14
STARTS = {0: [0, 5, 9], 1: [6]}
ALL_ON = dict(bigram_buckets=31, bigram_dim=6, value_embed_layers="0,3", value_residual=True,
              attn_out_gate="sparse")


def model_with(seed=0, **changes):
    model = GPT(tiny_cfg(**changes))
    perturb(model, seed=seed)
    return model


@pytest.mark.parametrize("looping", [False, True])
def test_documents_are_isolated(looping):
    model = model_with(**ALL_ON)
    model.set_recurrence(looping)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    changed = ids.clone()
    changed[0, 6:9] = torch.tensor([7, 8, 9])  # the middle document of row 0 (tokens after its BOS)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    other = torch.ones(B, T, dtype=torch.bool)
    other[0, 5:9] = False
    assert torch.equal(a[other], b[other])  # bit-exact: no path reads across a BOS
    assert (a[0, 6:9] - b[0, 6:9]).abs().max() > 1e-4


@pytest.mark.parametrize("leak", [dict(smear_bos_mask=False), dict(bigram_bos_mask=False), dict(doc_mask=False)])
def test_isolation_test_catches_each_leak(leak):
    model = model_with(**ALL_ON, **leak)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    changed = ids.clone()
    changed[0, 4] = 3  # last token of the first document of row 0
    with torch.no_grad():
        diff = (model(ids) - model(changed))[0, 5:]
    assert diff.abs().max() > 1e-5


@pytest.mark.parametrize("looping", [False, True])
def test_causal(looping):
    model = model_with(**ALL_ON, doc_mask=False, smear_bos_mask=False, bigram_bos_mask=False)
    model.set_recurrence(looping)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    for p in (3, 10):
        changed = ids.clone()
        changed[:, p] = (changed[:, p] + 5) % model.cfg.vocab_size
        with torch.no_grad():
            a, b = model(ids), model(changed)
        assert torch.equal(a[:, :p], b[:, :p])
        assert (a[:, p:] - b[:, p:]).abs().max() > 1e-4


@pytest.mark.parametrize("changes", [dict(), ALL_ON, dict(tie_embeddings=False, attn_out_gate="dense"),
                                     dict(unet_skips=False, parallel_from_layer=-1, loop_count=1, smear_gate=False,
                                          qk_gain_init=0.0, resid_mix=False)])
def test_param_groups_partition_all_parameters(changes):
    model = GPT(tiny_cfg(**changes))
    groups = model.param_groups()
    assert set(groups) == {"matrix", "embed", "scalar", "head"}
    seen = [id(p) for ps in groups.values() for p in ps]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert all(p.dim() == 2 for p in groups["matrix"])
    assert len(groups["head"]) == (0 if model.cfg.tie_embeddings else 1)
    assert model.tok_emb.weight in groups["embed"]
    assert sum(model.num_params(k) for k in groups) == model.num_params()
    n = model.cfg.num_layers
    assert len(groups["matrix"]) == 6 * n + (model.bigram is not None) + (model.value_embed is not None)


def test_record_param_count_and_describe():
    model = GPT(ModelConfig())
    n = model.num_params()
    print(f"record config (11L 512d MLP4x sp8192): {n:,} parameters; {model.describe()}")
    assert n == 35_945_623  # ~36M as CHALLENGE.md states: 31.72M matrices, 4.19M tied embedding, 31,895 scalars
    assert model.num_params("matrix") == 11 * (512 * 512 * 2 + 256 * 512 * 2 + 2048 * 512 * 2)
    line = model.describe()
    assert "\n" not in line and "17 virtual" in line and "35.95M" in line and "lanes from 8" in line


def test_reduction_none_and_ignore_index():
    model = model_with(**ALL_ON)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    targets = torch.randint(0, model.cfg.vocab_size, (B, T))
    targets[1, 3] = -100
    per_tok = model(ids, targets, reduction="none")
    assert per_tok.shape == (B, T) and per_tok[1, 3] == 0
    logits = model(ids)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(B, T)
    assert_close(per_tok, ce, 1e-5)
    with pytest.raises(ValueError, match="must match"):
        model(ids, targets[:, :-1])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(ids[0])


def test_backward_reaches_every_parameter():
    model = model_with(**ALL_ON, tie_embeddings=False)
    model.set_recurrence(True)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    model(ids, torch.randint(0, model.cfg.vocab_size, (B, T))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def _dense_attention(q, k, v, cu_seqlens, max_seqlen, xsa=True):
    """Compile-friendly stand-in for the reference kernel (which loops over cu_seqlens with .tolist())."""
    n = q.shape[0]
    pos = torch.arange(n, device=q.device)
    seg = torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)
    mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    g = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1),
                                       v.repeat_interleave(g, 1).transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return xsa_reference(o, v) if xsa else o


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_fullgraph_compile(monkeypatch):
    """The model's own code traces into one graph (static cu_seqlens included); the Inductor backend is
    exercised on the GPU by the trainer."""
    monkeypatch.setattr("pgolf.model.attention.attention", _dense_attention)
    model = model_with(**ALL_ON, max_docs_per_row=4)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    targets = torch.randint(0, model.cfg.vocab_size, (B, T))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for looping in (False, True):
        model.set_recurrence(looping)
        assert_close(compiled(ids, targets), model(ids, targets), 1e-6)
