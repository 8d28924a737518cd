"""The `pgolf` command. Each subcommand lives in its own module and is imported only when it is run."""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

import pgolf

# name -> (module holding `add_arguments(parser)` and `main(args)`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pgolf.run", "the main job: data -> train -> quantize -> compress -> evaluate, on bundled data by default"),
    "data": ("pgolf.data.cli", "train a tokenizer and write contest shards from text, or download FineWeb shards"),
    "train": ("pgolf.train.cli", "train a model (plain process or under torchrun)"),
    "quant": ("pgolf.quant.cli", "quantize and compress a trained checkpoint into an artifact"),
    "eval": ("pgolf.eval.cli", "evaluate a checkpoint or artifact: val_bpb, sliding window, TTT"),
    "bench": ("pgolf.bench.cli", "run the GPU benchmark suites and write bench/results"),
    "pack": ("pgolf.pack.cli", "pack a run directory into a contest submission folder"),
    "plot": ("pgolf.train.plot", "plot loss and val_bpb curves of runs to PNG"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    pgolf.LAUNCH_COMMAND = shlex.join(["pgolf", *argv])
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        sys.exit(2)
    result = importlib.import_module(COMMANDS[args.command][0]).main(args)
    if isinstance(result, int):
        sys.exit(result)
