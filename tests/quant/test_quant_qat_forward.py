"""QATForward: the model's function with fake-quantized weights, gradients straight through to the real weights."""
import torch

from pgolf.model import build_model
from pgolf.quant.config import QuantConfig
from pgolf.quant.qat import QATForward, fake_quantize, qat_plan

from ._toy import random_small_gpt, small_gpt_config


def test_qat_forward_equals_the_model_on_fake_quantized_weights_with_straight_through_grads():
    model = random_small_gpt(32, std=0.1)
    plan = qat_plan(model, QuantConfig(quant_min_numel=512))
    assert "blocks.0.mlp.w_up" in plan and "tok_emb.weight" in plan
    ids = torch.randint(4, 64, (2, 16))
    ids[:, 0] = 1

    loss = QATForward(model, plan)(ids, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    shadow = build_model(small_gpt_config(32))
    shadow.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, (bits, k) in plan.items():
            shadow.get_parameter(name).copy_(fake_quantize(model.get_parameter(name), bits, k))
    model.zero_grad()
    expected = shadow(ids, ids)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for name, p in shadow.named_parameters():  # d loss / d w = d loss / d Q(w): the straight-through estimator
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model(ids, ids), loss)  # the fake quantization changed the function
