"""The CLI registers every command module outright: no import cycle with `dvi.cli`, and a module
that fails to import is an error rather than a command silently missing from `--help`."""

import pathlib

import pytest

import dvi.cli as cli


def test_every_command_module_is_registered():
    on_disk = {p.stem for p in pathlib.Path(cli.__file__).with_name("commands").glob("*.py") if p.stem != "__init__"}
    assert set(cli.COMMAND_MODULES) == on_disk


def test_command_modules_import_the_app_not_the_cli():
    for path in pathlib.Path(cli.__file__).with_name("commands").glob("*.py"):
        assert "dvi.cli" not in path.read_text(), path.name


def test_a_broken_command_module_fails_loudly(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "no_such_command"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["--help"])
