"""The GPT and its switches; presets are data."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT

__all__ = ["GPT", "ModelConfig", "build_model"]


def build_model(model_config: dict[str, Any] | ModelConfig, state_dict: dict[str, torch.Tensor] | None = None,
                device: torch.device | str = "cpu") -> GPT:
    """The GPT of a saved config (a checkpoint's or artifact's dict), with its weights, recurrence on if it loops:
    the model as it stands after training, ready to calibrate or evaluate."""
    if not isinstance(model_config, ModelConfig):
        unknown = sorted(set(model_config) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            raise ValueError(f"pgolf.model: the saved model_config has fields this pgolf does not know: {unknown}")
        model_config = ModelConfig(**model_config)
    model = GPT(model_config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.to(device)
    model.set_recurrence(model_config.looped)
    return model
