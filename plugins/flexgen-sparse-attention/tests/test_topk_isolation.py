"""A broken plugin package beside this one costs a warning, never this plugin's runs.

A fake installed distribution whose entry point names a module that does not exist is put on
``sys.path`` (``importlib.metadata`` finds it exactly as it finds a pip-installed package).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "flexgen_sparse_attention",
    reason="flexgen-sparse-attention is not installed (pip install ./plugins/flexgen-sparse-attention)",
)

from flexgen import registry  # noqa: E402
from flexgen.errors import PluginError  # noqa: E402
from flexgen_sparse_attention import TopKAttention  # noqa: E402


@pytest.fixture
def broken_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Install (on sys.path only) ``flexgen-broken-example`` with attention plugin ``broken``."""
    info = tmp_path / "flexgen_broken_example-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flexgen-broken-example\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[flexgen.attention]\nbroken = flexgen_no_such_module_xyz:Backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield "flexgen-broken-example"
    monkeypatch.undo()
    registry.refresh()


class _Collect(logging.Handler):
    """Records warnings at the registry's logger itself, whatever other code did to propagation."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_listed_with_a_one_line_warning_naming_it(broken_distribution):
    logger = logging.getLogger("flexgen.registry")
    collect, level, disabled = _Collect(), logger.level, logger.disabled
    logger.addHandler(collect)
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    try:
        results = {(info.kind, info.name): error for info, error in registry.check_all()}
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
        logger.disabled = disabled
    assert results[("attention", "topk")] is None
    error = results[("attention", "broken")]
    assert error is not None and "broken" in error and broken_distribution in error and "\n" not in error
    warnings = [m for m in collect.messages if "broken" in m]
    assert len(warnings) == 1 and "\n" not in warnings[0]


def test_other_plugins_still_load(broken_distribution):
    assert isinstance(registry.create("attention", {"name": "topk", "ratio": 0.5}), TopKAttention)


def test_selecting_it_is_a_one_line_plugin_error(broken_distribution):
    with pytest.raises(PluginError, match="broken.*flexgen-broken-example.*failed to import") as info:
        registry.create("attention", "broken")
    assert "\n" not in str(info.value)


def test_allow_list_switches_plugins_off(broken_distribution, monkeypatch):
    monkeypatch.setenv(registry.ALLOW_ENV, "flexgen-sparse-attention")
    names = registry.available("attention")
    assert "topk" in names and "broken" not in names and "gpu" in names  # built-ins always allowed
    monkeypatch.setenv(registry.ALLOW_ENV, "flexgen-broken-example")
    with pytest.raises(PluginError, match="unknown attention plugin 'topk'"):
        registry.create("attention", "topk")
