"""Which code produced a result: the commit stamped into benchmark rows and run configs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

WORKING_TREE_MARK = " (working tree)"


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=repo)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(repo: str | Path | None = None) -> str:
    """PGOLF_COMMIT when set (a copy of the tree whose history is not the code's, e.g. on the device), else git's
    HEAD (12 hex digits), marked " (working tree)" when tracked files differ from it, else "unknown".

    The mark matters: a result stamped with a bare HEAD claims code that did not run. `repo` defaults to the
    checkout this package lives in."""
    if os.environ.get("PGOLF_COMMIT"):
        return os.environ["PGOLF_COMMIT"]
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parent
    head = _git(repo, "rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown"
    changes = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return head + WORKING_TREE_MARK if changes else head
