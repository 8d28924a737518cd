import subprocess

from pgolf.provenance import git_commit


def test_environment_commit_wins(monkeypatch):
    monkeypatch.setenv("PGOLF_COMMIT", "0123456789ab")
    assert git_commit() == "0123456789ab"


def test_git_head_without_environment(monkeypatch):
    monkeypatch.delenv("PGOLF_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit() == (head or "unknown")
