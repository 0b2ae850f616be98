"""Every option of every ``flexgen`` command says what it does in ``--help``; ``python -m flexgen`` is the CLI."""

from __future__ import annotations

import argparse
import importlib

import pytest

from flexgen.cli import COMMANDS


class _Parsed(Exception):
    """Raised instead of parsing: carries the parser the command built."""


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command, monkeypatch):
    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", capture)  # how the commands parse
    module_name, function_name = COMMANDS[command][0].split(":")
    with pytest.raises(_Parsed) as caught:
        getattr(importlib.import_module(module_name), function_name)([])
    parser = caught.value.args[0]
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert options, f"flexgen {command} has no options"
    for action in options:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"flexgen {command}: {name} has no help text"


def test_python_dash_m_flexgen_is_the_cli():
    """``python -m flexgen`` works from a checkout without the console script."""
    import subprocess
    import sys
    from pathlib import Path

    from flexgen import __version__

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "flexgen", "--version"], cwd=repo, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"flexgen {__version__}", result.stderr
    result = subprocess.run([sys.executable, "-m", "flexgen", "no-such-command"], cwd=repo, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "flexgen: error: unknown command 'no-such-command'"
