import subprocess
from pathlib import Path

import pytest

from pgolf.provenance import WORKING_TREE_MARK, git_commit


def test_environment_commit_wins(monkeypatch):
    monkeypatch.setenv("PGOLF_COMMIT", "0123456789ab")
    assert git_commit() == "0123456789ab"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_clean_head_then_working_tree_mark(monkeypatch, tmp_path):
    monkeypatch.delenv("PGOLF_COMMIT", raising=False)
    try:
        _git(tmp_path, "init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "--short=12", "HEAD")
    assert len(head) == 12
    (tmp_path / "untracked.txt").write_text("ignored by the mark\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + WORKING_TREE_MARK


def test_not_a_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("PGOLF_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"
