"""The `pgolf` command reports bad input as one line naming the problem (exit 2); PGOLF_DEBUG=1 re-raises."""
import pytest

from pgolf.cli import main


def test_missing_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PGOLF_DEBUG", raising=False)
    missing = tmp_path / "model.pgq"
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(missing)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pgolf eval: no such file {missing}\n(FileNotFoundError;")
    assert "Traceback" not in err


def test_debug_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("PGOLF_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["eval", str(tmp_path / "model.pgq")])


def test_bad_setting_names_the_field(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PGOLF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--out", str(tmp_path / "r"), "--set", "train.compile_scope=layer"])
    assert exc.value.code == 2
    assert "compile_scope must be model or blocks" in capsys.readouterr().err
