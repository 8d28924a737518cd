"""`pgolf train`: train a model as a plain process or under `torchrun --nproc_per_node=N`.

Settings come from defaults < `--preset NAME` < environment (FIELD_NAME) < flags (--field-name), for the
model (ModelConfig), the run (TrainConfig), the optimizer (OptimConfig) and QAT (QuantConfig). Presets live in
pgolf/model/presets.py; `--list-presets` shows them.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from pgolf import config as pconfig
from pgolf.train.config import TrainConfig

def _classes() -> dict[str, type]:
    from pgolf.model import ModelConfig
    from pgolf.quant.config import QuantConfig
    from pgolf.train.optim import OptimConfig

    return {"model": ModelConfig, "train": TrainConfig, "optim": OptimConfig, "quant": QuantConfig}


def build_configs(args: argparse.Namespace, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved ModelConfig, TrainConfig, OptimConfig and QuantConfig for these arguments."""
    from pgolf.model.presets import get_preset

    classes = _classes()
    bases = {c: cls() for c, cls in classes.items()}
    name = getattr(args, "preset", None)
    if name:
        try:
            preset = get_preset(name)
        except KeyError as exc:
            raise SystemExit(f"pgolf train: {exc.args[0]}") from None
        bases = {c: dataclasses.replace(bases[c], **preset.overrides(c)) for c in classes}
    return {c: pconfig.resolve(cls, args, bases[c], env=env) for c, cls in classes.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="start from a published system's settings (see --list-presets)")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    classes = _classes()
    pconfig.add_arguments(parser, classes["model"], "model (ModelConfig)")
    pconfig.add_arguments(parser, classes["train"], "training run (TrainConfig)")
    pconfig.add_arguments(parser, classes["optim"], "optimizer (OptimConfig)")
    pconfig.add_arguments(parser, classes["quant"], "quantization (QuantConfig: --qat and --qat-start-frac act in "
                                                    "training; the rest matters to `pgolf run` and `pgolf quant`)")


def _list_presets() -> int:
    from pgolf.model.presets import PRESETS

    for preset in PRESETS.values():
        print(preset.summary())
    return 0


def main(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets()
    from pgolf.train import distributed as pdist
    from pgolf.train.trainer import Trainer, TrainingDiverged

    cfgs = build_configs(args)
    if args.preset:
        from pgolf.model.presets import get_preset

        print(get_preset(args.preset).summary(), flush=True)
    try:
        Trainer(cfgs["model"], cfgs["train"], cfgs["optim"], quant_cfg=cfgs["quant"]).run()
    except TrainingDiverged as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    finally:
        pdist.destroy()
    return 0
