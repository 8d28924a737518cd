"""`pgolf data`: prepare shards from text, from the bundled sample, or download the published FineWeb shards.

    pgolf data prepare --input ../shared/corpus --vocab-size 8192 --out data/
    pgolf data sample --out data/
    pgolf data download --variant sp8192 --train-shards 10
"""
from __future__ import annotations

import argparse
import dataclasses

from pgolf.config import add_arguments as add_config_arguments
from pgolf.config import resolve
from pgolf.data.corpus import DataConfig, prepare, sample_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("prepare", help="train (or load) a tokenizer and write train/val shards + manifest",
                       description="Text (JSONL or plain, optionally .xz/.zst/.gz) -> SentencePiece BPE tokenizer "
                                   "-> fineweb_{train,val}_NNNNNN.bin shards + manifest.json")
    add_config_arguments(p, DataConfig)
    p = sub.add_parser("sample", help="shards from the bundled Wikipedia sample and its sp1024 tokenizer",
                       description="Prepare shards from the sample shipped inside pgolf (no other data needed). "
                                   "The prepare options apply; --input/--val-input/--tokenizer default to the "
                                   "sample's files.")
    add_config_arguments(p, DataConfig)
    p = sub.add_parser("download", help="download published FineWeb shards (needs the hub extra and network)")
    p.add_argument("--variant", default="sp8192", help="sp1024, sp4096, sp8192, ... [default: sp8192]")
    p.add_argument("--train-shards", type=int, default=10, help="train shards of 1e8 tokens [default: 10]")
    p.add_argument("--out", default="data", help="output root [default: data]")
    p.add_argument("--repo-id", default=None, help="hub dataset repo [default: willdepueoai/parameter-golf]")


def _report(manifest: dict) -> None:
    print(f"vocab {manifest['vocab_size']}, tokenizer {manifest['tokenizer']['path']}")
    for split, info in manifest["splits"].items():
        print(f"{split:5s}: {info['docs']:,} docs, {info['tokens']:,} tokens, {len(info['shards'])} shard(s)")
    if manifest["train_docs_dropped_in_val"]:
        print(f"dropped {manifest['train_docs_dropped_in_val']} training documents also in validation")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in manifest["seconds"].items()))


def main(args: argparse.Namespace) -> int:
    if args.data_command == "download":
        from pgolf.data.hub import DEFAULT_REPO_ID, download

        try:
            folder = download(args.variant, args.train_shards, args.out, repo_id=args.repo_id or DEFAULT_REPO_ID)
        except ImportError as exc:
            raise SystemExit(f"pgolf data download: {exc}") from None
        print(f"downloaded to {folder}")
        return 0
    if args.data_command == "sample":
        # sample defaults < environment < flags; then re-check the tokenizer against the chosen vocabulary
        cfg = sample_config(**dataclasses.asdict(resolve(DataConfig, args, base=sample_config())))
    else:
        cfg = resolve(DataConfig, args)
    manifest = prepare(cfg)
    _report(manifest)
    return 0
