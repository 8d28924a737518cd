"""`pgolf pack RUN_DIR`: write a contest submission folder (see pgolf.pack.packer)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `pgolf run` (config.json, results.json, artifact)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/submission)")
    from pgolf.pack.packer import ENCODINGS

    parser.add_argument("--encoding", default="latin1", choices=ENCODINGS,
                        help="how the compressed code sits in train_gpt.py: latin-1 bytes (smallest) or base85 "
                             "(pure ASCII, 25%% larger) [default: latin1]")


def main(args: argparse.Namespace) -> int:
    from pgolf.pack.packer import PackError, pack

    try:
        result = pack(args.run_dir, args.out, args.encoding)
    except PackError as exc:
        print(f"pgolf pack: {exc}")
        return 1
    print(f"wrote {result.out_dir}")
    return 0
