"""Regional compilation with inductor on the GPU: same loss and gradients as the eager model (bf16 autocast)."""
import copy

import pytest
import torch

from pgolf.model import GPT, ModelConfig

pytestmark = pytest.mark.gpu


def test_compiled_blocks_match_eager_on_cuda():
    cfg = ModelConfig(vocab_size=512, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, seq_len=256,
                      parallel_from_layer=2, loop_count=1)
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    ref = copy.deepcopy(model)
    ids = torch.randint(4, 512, (4, 256), device="cuda")
    ids[:, 0] = 1
    ids[:, 100] = 1
    targets = torch.randint(4, 512, (4, 256), device="cuda")
    model.compile_blocks()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, targets)
        ref_loss = ref(ids, targets)
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 2e-3 * ref_loss.item()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.isfinite(p.grad).all(), name
        scale = q.grad.norm().item()
        if scale > 1e-6:  # both bf16: compare at bf16's resolution, reordered sums included
            assert (p.grad - q.grad).norm().item() < 5e-2 * scale, name
