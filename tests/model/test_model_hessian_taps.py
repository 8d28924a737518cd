"""The calibration taps give GPTQ a Hessian for every block matrix and the head, without changing the function."""
import torch

from pgolf.model import GPT
from pgolf.model.config import ModelConfig
from pgolf.quant.hessian import collect_hessians

CFG = dict(vocab_size=97, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, seq_len=16,
           loop_start=1, loop_end=1, loop_count=2, parallel_from_layer=2, max_docs_per_row=0)


def test_every_block_matrix_and_the_head_get_a_hessian():
    torch.manual_seed(1)
    model = GPT(ModelConfig(**CFG))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ids = torch.randint(4, 97, (2, 16))
    ids[:, 0] = 1
    hs = collect_hessians(model, [ids])
    matrices = {n for n, _ in model.named_parameters() if n.split(".")[-1] in ("w_q", "w_k", "w_v", "w_o", "w_up",
                                                                                "w_down")}
    assert matrices | {"tok_emb.weight"} <= set(hs)
    # w_down's input is the MLP activation a = leaky(x W_up^T)^2 of width hidden, computed by the reference path
    x = torch.randn(5, 32)
    mlp = model.blocks[0].mlp
    seen = []
    handle = mlp.tap_down.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out_tapped = mlp(x)
    handle.remove()
    act = torch.square(torch.nn.functional.leaky_relu(x @ mlp.w_up.T, 0.5))
    torch.testing.assert_close(seen[0], act)
    torch.testing.assert_close(out_tapped, mlp(x))
    assert hs["blocks.0.mlp.w_down"].shape == (mlp.w_up.shape[0],) * 2
    assert hs["tok_emb.weight"].shape == (32, 32)
    h_head = hs["tok_emb.weight"]
    assert torch.allclose(h_head, h_head.T) and torch.linalg.eigvalsh(h_head.double()).min() > -1e-6
