"""The argument parser every ``flexgen`` command uses: a mistake is one line, not a usage dump.

Its errors are :class:`~flexgen.errors.ConfigError`, which the CLI prints as one line with
exit status 2, like every other user mistake; and options may come between the
``key=value`` overrides, as people type them.
"""

from __future__ import annotations

import argparse

from flexgen.errors import ConfigError


class ArgParser(argparse.ArgumentParser):
    """argparse that reports mistakes as a ConfigError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Options may come between the key=value overrides (``a=1 --restart b=2``), as people type them."""
        return self.parse_intermixed_args(args, namespace)
