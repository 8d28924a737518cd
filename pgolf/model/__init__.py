"""The GPT and its switches; presets are data."""
