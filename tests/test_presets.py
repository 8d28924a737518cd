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
