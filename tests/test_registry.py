"""Plugin discovery: built-ins and third-party plugins take one path through entry points."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flexgen import registry
from flexgen.errors import PluginError


def fake_distribution(root: Path, name: str, entry_points: str) -> None:
    """A distribution visible to importlib.metadata through sys.path, with no code installed."""
    info = root / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield tmp_path
    monkeypatch.undo()
    registry.refresh()


@pytest.fixture
def warnings_seen():
    logger = logging.getLogger("flexgen.registry")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


def test_builtins_come_from_flexgens_own_entry_points():
    listed = {(p.kind, p.name): p for p in registry.list_plugins()}
    for kind, name in [("storage", "disk"), ("attention", "cpu"), ("compressor", "int4"), ("scheduler", "zigzag")]:
        assert listed[(kind, name)].distribution == "flexgen"


def test_unknown_name_lists_what_exists():
    with pytest.raises(PluginError, match=r"unknown scheduler plugin 'zagzig'; available: .*row.*zigzag"):
        registry.create("scheduler", "zagzig")


def test_broken_third_party_plugin_is_one_warning(site, warnings_seen):
    fake_distribution(site, "flexgen-broken", "[flexgen.schedulers]\nbroken = no_such_module_anywhere:S\n")
    broken = registry.warn_broken()
    assert [(b.kind, b.name, b.distribution) for b in broken] == [("scheduler", "broken", "flexgen-broken")]
    lines = [m for m in warnings_seen if "broken" in m]
    assert len(lines) == 1 and "\n" not in lines[0] and "flexgen-broken" in lines[0]
    assert registry.create("scheduler", "zigzag") is not None  # the rest still works


def test_a_builtin_name_cannot_be_taken_over(site, warnings_seen):
    fake_distribution(site, "flexgen-impostor", "[flexgen.schedulers]\nzigzag = no_such_module_anywhere:S\n")
    assert registry.available("scheduler")["zigzag"].value == "flexgen.scheduling.zigzag:ZigZagScheduler"
    assert any("flexgen-impostor" in m and "using flexgen's" in m for m in warnings_seen)


def test_options_are_passed_and_checked():
    assert registry.create("attention", {"name": "cpu", "dtype": "bfloat16"}).compute_dtype.is_floating_point
    with pytest.raises(PluginError, match="plugins.attention: bad options for attention plugin 'cpu'"):
        registry.create("attention", {"name": "cpu", "colour": "red"})
    with pytest.raises(PluginError, match="needs a 'name' key"):
        registry.create("attention", {"dtype": "float32"})


def test_builtin_fallback_repeats_pyproject():
    """The families an old install falls back on are exactly what pyproject.toml registers."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    registered = pyproject["project"]["entry-points"]
    for group, builtins in registry.BUILTIN_FALLBACK.items():
        assert registered[group] == builtins, group


def test_model_families_are_builtin_plugins():
    listed = {(p.kind, p.name): p for p in registry.list_plugins()}
    assert listed[("model", "opt")].distribution == "flexgen"
    assert listed[("model", "llama")].target == "flexgen.models.llama:LlamaFamily"
