"""The README documents every flag of the scripts, and its two set-up commands are the ones CI and make run."""
from __future__ import annotations

from conftest import ROOT

from cli import markdown_flags, read_settings


def test_every_setting_is_documented_with_its_current_default():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for script in ("train.py", "predict.py", "evaluate.py", "app.py"):
        assert markdown_flags(ROOT / script) in readme, f"README flag table of {script} is out of date"
        assert read_settings(ROOT / script)


def test_the_two_commands_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    assert "\ndemo: install" in makefile and "\ntest: install" in makefile
    assert "make app" in readme and "\napp: install" in makefile  # the web page
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_help_of_every_script_prints(capsys):
    import pytest
    from cli import parse_settings
    for script in ("train.py", "predict.py", "evaluate.py"):
        with pytest.raises(SystemExit) as e:
            parse_settings(ROOT / script, ["--help"])
        assert e.value.code == 0 and "--threshold" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        parse_settings(ROOT / "app.py", ["--help"])
    assert e.value.code == 0 and "--host" in capsys.readouterr().out
