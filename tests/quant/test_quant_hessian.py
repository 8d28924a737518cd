"""Hessian collection (hooks, looped layers, tied head, dedupe) and self-generated calibration."""
import torch

from pgolf import BOS_ID
from pgolf.quant.hessian import collect_hessians, default_targets, generate_calibration

from ._toy import Toy


def _manual(model, batches):
    """X^T X / rows by calling the pieces by hand: block 1 runs twice per forward."""
    acc = {}

    def add(name, x):
        x = x.reshape(-1, x.shape[-1]).float()
        s, n = acc.get(name, (0, 0))
        acc[name] = (s + x.T @ x, n + x.shape[0])

    with torch.no_grad():
        for ids in batches:
            x = model.emb(ids)
            for i in (0, 1, 1):
                b = model.blocks[i]
                h = b.norm(x)
                add(f"blocks.{i}.q.weight", h)
                x = x + b.q(h) + b.k(h).repeat(1, 1, 2)
                h2 = b.norm(x)
                add(f"blocks.{i}.mlp_up.weight", h2)
                a = torch.relu(b.mlp_up(h2))
                add(f"blocks.{i}.mlp_down.weight", a)
                x = x + b.mlp_down(a)
            add("emb.weight", model.final_norm(x) * model.gain)
    return {k: s / n for k, (s, n) in acc.items()}


def test_hooks_accumulate_every_pass_and_the_tied_head():
    torch.manual_seed(0)
    model = Toy()
    batches = [torch.randint(0, 97, (2, 9)) for _ in range(3)]
    hs = collect_hessians(model, batches)
    ref = _manual(model, batches)
    # the head is an nn.Linear tied to emb.weight: its input Hessian is stored under the embedding's name
    linears = {f"blocks.{i}.{m}.weight" for i in (0, 1) for m in ("q", "k", "mlp_up", "mlp_down")}
    assert set(hs) == linears | {"emb.weight"}
    for name, h in ref.items():
        torch.testing.assert_close(hs[name], h, rtol=1e-5, atol=1e-6)
    assert hs["blocks.1.q.weight"] is hs["blocks.1.k.weight"]  # same input -> one shared tensor
    assert hs["blocks.0.q.weight"] is not hs["blocks.1.q.weight"]


def test_head_input_as_module_or_callable():
    torch.manual_seed(1)
    model = Toy()
    batches = [torch.randint(0, 97, (1, 12))]
    targets = {n: t for n, t in default_targets(model).items() if n != "emb.weight"}
    by_module = collect_hessians(model, batches, targets=dict(targets), head_input=model.final_norm)
    by_callable = collect_hessians(model, batches, targets=dict(targets), head_input=lambda m, ids: m.features(ids))
    torch.testing.assert_close(by_module["emb.weight"], by_callable["emb.weight"])
    assert set(by_module) == set(targets) | {"emb.weight"}


def test_generate_calibration_starts_at_bos_and_is_seeded():
    torch.manual_seed(2)
    model = Toy()
    a = generate_calibration(model, n_seqs=3, seq_len=6, batch_size=2, seed=5)
    b = generate_calibration(model, n_seqs=3, seq_len=6, batch_size=2, seed=5, window=4)
    assert a.shape == (3, 6) and (a[:, 0] == BOS_ID).all() and a.max() < 97
    assert b.shape == (3, 6)
    assert torch.equal(a, generate_calibration(model, n_seqs=3, seq_len=6, batch_size=2, seed=5))
    assert model.training
