"""`pgolf train`: train a model as a plain process or under `torchrun --nproc_per_node=N`.

Settings come from defaults < `--preset NAME` < environment (FIELD_NAME) < flags (--field-name), for the
model (ModelConfig), the run (TrainConfig) and the optimizer (OptimConfig). Presets live in
pgolf/model/presets.py; `--list-presets` shows them.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any

from pgolf import config as pconfig
from pgolf.train.config import TrainConfig

CONCERNS = ("model", "train", "optim")


def _classes() -> dict[str, type]:
    from pgolf.model import ModelConfig
    from pgolf.train.optim import OptimConfig

    return {"model": ModelConfig, "train": TrainConfig, "optim": OptimConfig}


def load_presets() -> dict[str, Any]:
    """pgolf.model.presets.PRESETS when that module exists, else no presets."""
    try:
        module = importlib.import_module("pgolf.model.presets")
    except ModuleNotFoundError as exc:
        if exc.name != "pgolf.model.presets":
            raise
        return {}
    return dict(getattr(module, "PRESETS", {}))


def preset_overrides(preset: Any, classes: dict[str, type]) -> dict[str, dict]:
    """A preset's field overrides per concern.

    Accepts a preset object with `overrides(concern)`, a dict keyed by concern ({"model": {...}, ...}), or a
    flat dict of field names, each sent to the one config class that has that field.
    """
    if hasattr(preset, "overrides"):
        return {c: dict(preset.overrides(c)) for c in classes}
    if not isinstance(preset, dict):
        raise TypeError(f"a preset must be a dict or have overrides(concern), not {type(preset).__name__}")
    if preset and all(k in CONCERNS and isinstance(v, dict) for k, v in preset.items()):
        return {c: dict(preset.get(c, {})) for c in classes}
    fields = {c: {f.name for f in dataclasses.fields(cls)} for c, cls in classes.items()}
    out: dict[str, dict] = {c: {} for c in classes}
    for key, value in preset.items():
        owners = [c for c in classes if key in fields[c]]
        if not owners:
            names = ", ".join(cls.__name__ for cls in classes.values())
            raise ValueError(f"preset field {key!r} is not a field of {names}")
        for c in owners:
            out[c][key] = value
    return out


def build_configs(args: argparse.Namespace, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved ModelConfig, TrainConfig and OptimConfig for these arguments."""
    classes = _classes()
    bases = {c: cls() for c, cls in classes.items()}
    name = getattr(args, "preset", None)
    if name:
        presets = load_presets()
        if name not in presets:
            known = ", ".join(presets) or "none (pgolf/model/presets.py is missing)"
            raise SystemExit(f"pgolf train: unknown preset {name!r}; known presets: {known}")
        for concern, changes in preset_overrides(presets[name], classes).items():
            valid = {f.name for f in dataclasses.fields(classes[concern])}
            bad = sorted(set(changes) - valid)
            if bad:
                raise SystemExit(f"pgolf train: preset {name!r} sets unknown {concern} fields {bad}")
            bases[concern] = dataclasses.replace(bases[concern], **changes)
    return {c: pconfig.resolve(cls, args, bases[c], env=env) for c, cls in classes.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="start from a published system's settings (see --list-presets)")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    classes = _classes()
    pconfig.add_arguments(parser, classes["model"], "model (ModelConfig)")
    pconfig.add_arguments(parser, classes["train"], "training run (TrainConfig)")
    pconfig.add_arguments(parser, classes["optim"], "optimizer (OptimConfig)")


def _list_presets() -> int:
    presets = load_presets()
    if not presets:
        print("no presets (pgolf/model/presets.py is missing)")
    for name, preset in presets.items():
        print(preset.summary() if hasattr(preset, "summary") else f"{name}: {preset}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets()
    from pgolf.train import distributed as pdist
    from pgolf.train.trainer import Trainer, TrainingDiverged

    cfgs = build_configs(args)
    try:
        Trainer(cfgs["model"], cfgs["train"], cfgs["optim"]).run()
    except TrainingDiverged as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    finally:
        pdist.destroy()
    return 0
