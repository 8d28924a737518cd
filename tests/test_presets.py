"""Presets are data: every override names a real field of its config concern and builds a valid config."""
import dataclasses

import pytest

from pgolf.eval.config import EvalConfig
from pgolf.model.config import ModelConfig
from pgolf.model.presets import CONCERNS, PRESETS, get_preset
from pgolf.quant.config import QuantConfig
from pgolf.train.config import TrainConfig
from pgolf.train.optim import OptimConfig

CLASSES = {"model": ModelConfig, "train": TrainConfig, "optim": OptimConfig, "quant": QuantConfig, "eval": EvalConfig}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_fields_exist_and_validate(name):
    preset = get_preset(name)
    for concern in CONCERNS:
        cls = CLASSES[concern]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(preset.overrides(concern)) - names
        assert not unknown, f"{name}.{concern} names unknown fields {unknown}"
        cfg = dataclasses.replace(cls(), **preset.overrides(concern))
        if hasattr(cfg, "validate"):
            cfg.validate()
    assert preset.overrides("model")["vocab_size"] == preset.vocab_size
    assert preset.name in preset.summary()


def test_all_published_systems_present():
    assert {"baseline", "pr1855", "pr1962", "pr1732", "pr1473", "pr578", "pr1123", "pgolf-best"} <= set(PRESETS)
    best = PRESETS["pgolf-best"]
    for other in PRESETS.values():
        if other.name != best.name:
            assert any(best.overrides(c) != other.overrides(c) for c in CONCERNS)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("nope")


def reduced(preset) -> ModelConfig:
    """The preset's model at a width a CPU test can train: same depth and switches, tiny dimensions."""
    model = preset.overrides("model")
    small = dict(vocab_size=256, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=32,
                 rope_dims=min(model.get("rope_dims", ModelConfig().rope_dims), 8),
                 bigram_buckets=min(model.get("bigram_buckets", 0), 64), bigram_dim=16, value_embed_dim=16,
                 max_docs_per_row=0)
    return dataclasses.replace(ModelConfig(), **{**model, **small})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_a_few_steps_at_reduced_width(name):
    import torch

    from pgolf.model import GPT
    from pgolf.train.optim import build_optimizer

    preset = get_preset(name)
    cfg = reduced(preset)
    model = GPT(cfg)
    model.set_recurrence(cfg.looped)
    optim = dataclasses.replace(OptimConfig(), **preset.overrides("optim"))
    opt = build_optimizer(model.param_groups(), optim)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (4, cfg.seq_len + 1), generator=gen)
    ids[:, 0] = 1
    ids[:, 17] = 1
    x, y = ids[:, :-1], ids[:, 1:]
    losses = []
    for step in range(4):
        loss = model(x, y)
        loss.backward()
        opt.set_step(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], f"{name}: loss did not fall on a repeated batch: {losses}"
