"""Phased LoRA TTT on the GPU (bf16 autocast, Triton attention with document masks): a batch of documents gives
each document the scores it gets when adapted alone, and with lr 0 the scores are the model's own."""
import numpy as np
import pytest
import torch

from pgolf.bench.harness import random_documents
from pgolf.eval.bpb import ByteTables
from pgolf.eval.config import EvalConfig
from pgolf.eval.evaluate import evaluate
from pgolf.eval.sliding import TokenRecorder
from pgolf.model import GPT, ModelConfig

pytestmark = pytest.mark.gpu

VOCAB = 512


def _tables() -> ByteTables:
    ids = torch.arange(VOCAB)
    return ByteTables((1 + ids % 3).to(torch.int32), ids % 2 == 0, ids < 4)


def _model() -> GPT:
    cfg = ModelConfig(vocab_size=VOCAB, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, seq_len=256,
                      parallel_from_layer=2, loop_count=1)
    torch.manual_seed(0)
    return GPT(cfg).cuda().eval()


def _scores(model: GPT, tokens: np.ndarray, **kw) -> tuple[dict, TokenRecorder]:
    rec = TokenRecorder(len(tokens))
    cfg = EvalConfig(**{**dict(mode="lora_ttt", phases=0, lora_rank=8, lora_chunk=32, lora_lr=1e-3), **kw})
    return evaluate(model, tokens, _tables(), cfg, recorder=rec), rec


def test_batched_documents_score_as_alone_in_bf16():
    model = _model()
    tokens = random_documents(3001, VOCAB, median_doc=150.0, seed=3)  # awkward lengths, some over the window
    batched, rec = _scores(model, tokens, lora_batch_docs=16)
    alone, rec_alone = _scores(model, tokens, lora_batch_docs=1)
    assert (rec.count[1:] == 1).all() and batched["tokens"] == len(tokens) - 1
    assert np.isfinite(rec.nll[1:]).all()
    # bf16 matmuls of different batch sizes round differently; the adapted scores stay within bf16 noise
    np.testing.assert_allclose(rec.nll[1:], rec_alone.nll[1:], rtol=2e-2, atol=2e-2)
    assert abs(batched["val_bpb"] - alone["val_bpb"]) < 2e-3 * alone["val_bpb"]


def test_lr_zero_scores_what_document_aware_sliding_scores():
    model = _model()
    tokens = random_documents(2003, VOCAB, median_doc=120.0, seed=4)
    lora, _ = _scores(model, tokens, lora_batch_docs=8, lora_lr=0.0, lora_weight_decay=0.0)
    plain = evaluate(model, tokens, _tables(), EvalConfig(mode="sliding", stride=32, doc_aware=True))
    assert abs(lora["val_bpb"] - plain["val_bpb"]) < 5e-3 * plain["val_bpb"]
