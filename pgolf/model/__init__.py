"""The GPT and its switches; presets are data."""
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT

__all__ = ["GPT", "ModelConfig"]
