"""Regional compilation: the blocks compiled one by one give the same loss and gradients as the eager model,
with fewer graphs than blocks (blocks with the same switches share one)."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from pgolf.model import GPT, ModelConfig
from pgolf.quant.config import QuantConfig
from pgolf.quant.qat import QATForward, qat_plan
from pgolf.train.config import TrainConfig, validate


def test_compiled_blocks_match_eager_and_share_graphs(monkeypatch):
    monkeypatch.setenv("PGOLF_KERNELS", "triton")  # custom ops trace as one node; the interpreter runs them on CPU
    cfg = ModelConfig(vocab_size=64, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4,
                      seq_len=16, parallel_from_layer=4, loop_count=1, max_docs_per_row=8)
    torch.manual_seed(0)
    model = GPT(cfg)
    ref = copy.deepcopy(model)
    ids = torch.randint(4, 64, (2, 16))
    ids[:, 0] = 1
    ids[1, 7] = 1
    targets = torch.randint(4, 64, (2, 16))
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks(backend="aot_eager")
    loss = model(ids, targets)
    loss.backward()
    ref_loss = ref(ids, targets)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert 1 <= counters["stats"]["unique_graphs"] < len(model.blocks)
    plan = qat_plan(model, QuantConfig(quant_min_numel=256))  # QAT swaps the weights under the compiled blocks
    assert plan
    torch.testing.assert_close(QATForward(model, plan)(ids, targets), QATForward(ref, plan)(ids, targets),
                               rtol=1e-6, atol=1e-6)
    model.compile_blocks(fullgraph=False, backend="aot_eager")  # recompiling wraps the method, not the wrapper
    torch.testing.assert_close(model(ids, targets), ref_loss, rtol=1e-6, atol=1e-6)
    compiled = model.blocks[0].forward
    with model.eager_blocks():
        assert "forward" not in model.blocks[0].__dict__
        torch.testing.assert_close(model(ids, targets), ref_loss, rtol=1e-6, atol=1e-6)
    assert model.blocks[0].forward is compiled
    assert model.blocks_compiled
    assert len(model.uncompile_blocks()) == 2 * len(model.blocks) and not model.uncompile_blocks()
    assert not model.blocks_compiled


def test_compile_scope_is_checked():
    validate(TrainConfig(compile_scope="blocks"))
    with pytest.raises(ValueError, match="compile_scope must be model or blocks"):
        validate(TrainConfig(compile_scope="layer"))
