"""Block layout: U-Net skips, two lanes, recurrence, resid mix (whole stack vs ref_hidden), and cu_seqlens."""
import pytest
import torch

from model_refs import BOS, assert_close, docs_batch, perturb, ref_hidden, tiny_cfg
from pgolf.model import GPT, ModelConfig
from pgolf.model.layout import doc_cu_seqlens, layer_sequence, num_skip_weights, split_encoder_decoder

B, T = 2, 11
STARTS = {0: [0, 4], 1: [6, 7]}


def test_record_schedule():
    cfg = ModelConfig()
    assert layer_sequence(cfg, False) == list(range(11))
    assert layer_sequence(cfg, True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert split_encoder_decoder(cfg, False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert split_encoder_decoder(cfg, True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert num_skip_weights(cfg) == 8
    assert num_skip_weights(ModelConfig(loop_count=1)) == 5
    assert num_skip_weights(ModelConfig(unet_skips=False)) == 0


# (config changes, encoder, decoder, lane layers) for recurrence off / on, written out by hand for the
# 6-layer tiny model with loop 1..2 x3 and lanes from layer 4.
CASES = {
    "record-like": (dict(), [0, 1, 2], [3, 4, 5], [0, 1, 2, 1, 2], [1, 2, 3, 4, 5], {4, 5}),
    "no-lanes": (dict(parallel_from_layer=-1), [0, 1, 2], [3, 4, 5], [0, 1, 2, 1, 2], [1, 2, 3, 4, 5], set()),
    "lanes-attn-out": (dict(parallel_final_lane="attn"), [0, 1, 2], [3, 4, 5], [0, 1, 2, 1, 2], [1, 2, 3, 4, 5],
                       {4, 5}),
    "lanes-mlp-out": (dict(parallel_final_lane="mlp", parallel_from_layer=3), [0, 1, 2], [3, 4, 5],
                      [0, 1, 2, 1, 2], [1, 2, 3, 4, 5], {3, 4, 5}),
    "no-unet": (dict(unet_skips=False), [], [0, 1, 2, 3, 4, 5], [], [0, 1, 2, 1, 2, 1, 2, 3, 4, 5], {4, 5}),
    "ungated-skips": (dict(skip_gates=False), [0, 1, 2], [3, 4, 5], [0, 1, 2, 1, 2], [1, 2, 3, 4, 5], {4, 5}),
    "no-mix-no-ln": (dict(resid_mix=False, ln_scale=False), [0, 1, 2], [3, 4, 5], [0, 1, 2, 1, 2],
                     [1, 2, 3, 4, 5], {4, 5}),
    "everything": (dict(value_residual=True, value_embed_layers="2,5", bigram_buckets=29, bigram_dim=6,
                        attn_out_gate="dense", xsa_layers="last:3", mlp_negative_slope=0.0, tie_embeddings=False),
                   [0, 1, 2], [3, 4, 5], [0, 1, 2, 1, 2], [1, 2, 3, 4, 5], {4, 5}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stack_matches_hand_wired_reference(name):
    changes, enc, dec, enc_loop, dec_loop, lanes = CASES[name]
    model = GPT(tiny_cfg(**changes))
    perturb(model, seed=1)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    with torch.no_grad():
        for looping, e, d in ((False, enc, dec), (True, enc_loop, dec_loop)):
            model.set_recurrence(looping)
            assert (model._encoder, model._decoder) == (e, d)
            assert model.virtual_layers() == len(e) + len(d)
            assert_close(model.hidden(ids), ref_hidden(model, ids, e, d, lanes), 2e-4)


def test_recurrence_changes_depth_and_output():
    model = GPT(tiny_cfg())
    perturb(model, seed=2)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    with torch.no_grad():
        off = model(ids)
        model.set_recurrence(True)
        assert model.looping and model.virtual_layers() == 10
        on = model(ids)
        model.set_recurrence(False)
        assert model.virtual_layers() == 6
        assert torch.equal(model(ids), off)
    assert (on - off).abs().max() > 1e-3
    single = GPT(tiny_cfg(loop_count=1))
    single.set_recurrence(True)
    assert not single.looping and single.virtual_layers() == 6


def test_resid_mix_reads_x0():
    model = GPT(tiny_cfg(parallel_from_layer=-1))
    perturb(model, seed=3)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    plain = GPT(tiny_cfg(parallel_from_layer=-1, resid_mix=False))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "resid_mix" not in k})
    with torch.no_grad():
        assert not torch.allclose(model.hidden(ids), plain.hidden(ids))
        for blk in model.blocks:
            blk.resid_mix[0].fill_(1.0)
            blk.resid_mix[1].fill_(0.0)
        assert_close(model.hidden(ids), plain.hidden(ids), 1e-6)


def test_skip_wiring_pops_lifo():
    """Decoder blocks muted (outputs = inputs): the input of decoder j is the input of decoder j-1 plus
    w_j * (the encoder output pushed (j+1)-th from last)."""
    model = GPT(tiny_cfg(parallel_from_layer=-1, skip_gates=False, loop_count=1, resid_mix=False))
    perturb(model, seed=4)
    ids = docs_batch(B, T, model.cfg.vocab_size, STARTS)
    enc_out, dec_in = [], []
    for i, blk in enumerate(model.blocks):
        if i < 3:
            blk.register_forward_hook(lambda m, a, out: enc_out.append(out[0]))
        else:
            blk.register_forward_pre_hook(lambda m, a: dec_in.append(a[0]))
    with torch.no_grad():
        for blk in model.blocks[3:]:
            blk.attn_scale.zero_()
            blk.mlp_scale.zero_()
        model.hidden(ids)
        w = model.skip_weights
        assert_close(dec_in[0], enc_out[2] + w[0] * enc_out[2], 1e-6)
        assert_close(dec_in[1], dec_in[0] + w[1] * enc_out[1], 1e-6)
        assert_close(dec_in[2], dec_in[1] + w[2] * enc_out[0], 1e-6)


def test_cu_seqlens_static_and_exact():
    ids = docs_batch(3, 8, 50, {0: [0, 3], 1: [1, 2, 7], 2: []})
    exact = [0, 3, 8, 9, 10, 15, 16, 24]
    assert doc_cu_seqlens(ids, BOS, True, 0).tolist() == exact
    padded = doc_cu_seqlens(ids, BOS, True, 4)
    assert padded.dtype == torch.int32 and padded.numel() == 3 * 4 + 1
    assert padded.tolist() == [0, 3, 8, 8, 8, 9, 10, 15, 16, 24, 24, 24, 24]
    assert sorted(set(padded.tolist())) == exact
    assert doc_cu_seqlens(ids, BOS, True, 100).tolist() == [0, 3] + [8] * 6 + [8, 9, 10, 15] + [16] * 4 + \
        [16] + [24] * 7 + [24]
    assert doc_cu_seqlens(ids, BOS, False, 4).tolist() == [0, 8, 16, 24]
    with pytest.raises(RuntimeError, match="max_docs_per_row"):
        doc_cu_seqlens(ids, BOS, True, 3)
