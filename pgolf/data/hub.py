"""Download the published FineWeb shards from the Hugging Face hub (the `hub` extra: huggingface_hub).

Layout of the dataset repo `willdepueoai/parameter-golf` (repo_type "dataset"), under the folder `datasets/`:
`manifest.json`, `datasets/fineweb10B_sp<V>/fineweb_{train,val}_NNNNNN.bin` and `tokenizers/...`. The
manifest lists datasets (name, tokenizer_name, stats.files_train / files_val) and tokenizers (model_path,
vocab_path); shard counts and tokenizer files are taken from it rather than hard-coded. Files land in the
local layout that `pgolf data prepare` writes: `<out>/datasets/fineweb10B_sp<V>/` and `<out>/tokenizers/`.

This workplace has no network access to the hub, so this module is not exercised by the tests here; it is
kept thin so that what it does can be checked by reading. Records with sp8192 data were published on other
repos too; pass `repo_id` for those.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"


def _hf_hub_download():
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError("downloading FineWeb needs huggingface_hub: pip install 'pgolf[hub]' "
                          "(or pip install huggingface_hub)") from None
    return hf_hub_download


def _fetch(repo_id: str, remote_path: str, dest: Path) -> Path:
    """Download one file of the dataset repo to `dest` (hard link to the hub cache where possible)."""
    if dest.is_file():
        return dest
    remote = Path(remote_path)
    cached = Path(_hf_hub_download()(repo_id=repo_id, filename=remote.name, subfolder=remote.parent.as_posix(),
                                     repo_type="dataset")).resolve(strict=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(cached, dest)
    except OSError:
        shutil.copy2(cached, dest)
    return dest


def download(variant: str = "sp8192", train_shards: int = 10, out: str | os.PathLike = "data",
             repo_id: str = DEFAULT_REPO_ID, remote_root: str = DEFAULT_REMOTE_ROOT) -> Path:
    """Fetch the manifest, all validation shards, the first `train_shards` train shards and the tokenizer of
    `variant` (e.g. sp1024, sp8192); returns the local dataset folder."""
    if not (variant.startswith("sp") and variant[2:].isdigit()):
        raise ValueError(f"variant must look like sp1024 or sp8192, got {variant!r}")
    if train_shards < 0:
        raise ValueError("train_shards must be >= 0")
    out = Path(out)
    manifest_file = _fetch(repo_id, f"{remote_root}/manifest.json", out / "manifest.json")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    name = f"fineweb10B_{variant}"
    dataset = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if dataset is None:
        names = [d.get("name") for d in manifest.get("datasets", [])]
        raise ValueError(f"{repo_id}: no dataset {name} in its manifest (it has {names})")
    stats = dataset.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise ValueError(f"{repo_id}: {name} has {n_train} train shards, {train_shards} requested")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == dataset.get("tokenizer_name")), None)
    if tok is None:
        raise ValueError(f"{repo_id}: tokenizer {dataset.get('tokenizer_name')!r} of {name} not in its manifest")

    folder = out / "datasets" / name
    for split, count in (("val", n_val), ("train", train_shards)):
        for i in range(count):
            shard = f"fineweb_{split}_{i:06d}.bin"
            _fetch(repo_id, f"{remote_root}/datasets/{name}/{shard}", folder / shard)
    for key in ("model_path", "vocab_path", "path"):
        if tok.get(key):
            rel = Path(tok[key])
            _fetch(repo_id, f"{remote_root}/{rel.as_posix()}", out / "tokenizers" / rel.name)
    return folder
