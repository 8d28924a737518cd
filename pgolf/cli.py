"""The `pgolf` command. Each subcommand lives in its own module and is imported only when it is run."""
from __future__ import annotations

import argparse
import importlib
import os
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
    try:
        result = importlib.import_module(COMMANDS[args.command][0]).main(args)
    except _user_errors() as exc:
        if os.environ.get("PGOLF_DEBUG"):
            raise
        message = str(exc) if str(exc).startswith("pgolf") else f"pgolf {args.command}: {exc}"
        print(f"{message}\n({type(exc).__name__}; PGOLF_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
    if isinstance(result, int):
        sys.exit(result)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises (missing or corrupt files, settings out of range, a vocab that does not match, an
    artifact over the limit, a diverged run): reported as one line naming the file and the problem."""
    errors: list[type[BaseException]] = [FileNotFoundError, NotADirectoryError, ValueError]
    trainer = sys.modules.get("pgolf.train.trainer")
    if trainer is not None:
        errors.append(trainer.TrainingDiverged)
    return tuple(errors)
