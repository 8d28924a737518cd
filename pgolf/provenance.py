"""Which code produced a result: the commit stamped into benchmark rows and run configs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """PGOLF_COMMIT when set (a copy of the tree without its history, e.g. on the device), else git's HEAD
    (12 hex digits), else "unknown"."""
    if os.environ.get("PGOLF_COMMIT"):
        return os.environ["PGOLF_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
