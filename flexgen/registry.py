"""Plugin discovery through Python entry points.

Every plugin, built-in or third-party, is found the same way: an entry point in one of the
groups below, named by the short name a config uses. flexgen's own ``pyproject.toml``
registers the built-ins, so there is no second, private path.

A broken third-party package costs a one-line warning, not every run: when ``flexgen predict``
or ``flexgen bench`` starts (and in ``flexgen plugins``), every allowed third-party plugin is
imported once and each failure is logged in one line; the run fails only if its config selects
the broken plugin. From Python, a plugin's module is imported when it is first selected. The
environment variable ``FLEXGEN_PLUGINS`` is an allow-list: a comma-separated list of
distribution names (or ``kind:name`` pairs) whose plugins may load; flexgen's own built-ins
are always allowed. Unset means every installed plugin is allowed.

Model families (``flexgen.models``: OPT, Llama, ...) are plugins like the others. An install of
flexgen made before that group existed has no ``flexgen.models`` entry points in its metadata;
until it is reinstalled, the built-in families are taken from :data:`BUILTIN_FALLBACK`, which
repeats what ``pyproject.toml`` registers (a test keeps the two equal), so such an install still
runs every family and third-party families still register through their own entry points.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from flexgen.errors import FlexGenError, PluginError

log = logging.getLogger(__name__)

#: plugin kind -> entry-point group
GROUPS: dict[str, str] = {
    "storage": "flexgen.storage",
    "attention": "flexgen.attention",
    "compressor": "flexgen.compressors",
    "scheduler": "flexgen.schedulers",
    "model": "flexgen.models",
}

#: Built-ins of groups added after a flexgen install may have been made (see the module
#: docstring): used only while flexgen's installed metadata registers nothing in the group.
BUILTIN_FALLBACK: dict[str, dict[str, str]] = {
    "flexgen.models": {
        "opt": "flexgen.models.opt_family:OPTFamily",
        "llama": "flexgen.models.llama:LlamaFamily",
    },
}
_FALLBACK_VALUES = {(group, name, value) for group, eps in BUILTIN_FALLBACK.items() for name, value in eps.items()}

BUILTIN_DISTRIBUTION = "flexgen"
ALLOW_ENV = "FLEXGEN_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, as ``flexgen plugins`` lists it."""

    kind: str
    name: str
    distribution: str
    target: str  # "module:Class"


def _distribution_of(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None and (ep.group, ep.name, ep.value) in _FALLBACK_VALUES:
        return BUILTIN_DISTRIBUTION
    return dist.metadata["Name"] if dist is not None else "?"


def _allowed(kind: str, name: str, distribution: str) -> bool:
    allow = os.environ.get(ALLOW_ENV)
    if not allow or distribution == BUILTIN_DISTRIBUTION:
        return True
    wanted = {item.strip() for item in allow.split(",") if item.strip()}
    return distribution in wanted or f"{kind}:{name}" in wanted


def _check_kind(kind: str) -> str:
    if kind not in GROUPS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(GROUPS)}")
    return GROUPS[kind]


@cache
def _entry_points(group: str) -> tuple[EntryPoint, ...]:
    # Scanning installed distributions is slow; once per process is enough.
    found = tuple(entry_points(group=group))
    if group in BUILTIN_FALLBACK and not any(_distribution_of(ep) == BUILTIN_DISTRIBUTION for ep in found):
        found = tuple(EntryPoint(name=name, value=value, group=group)
                      for name, value in BUILTIN_FALLBACK[group].items()) + found
    return found


def refresh() -> None:
    """Forget what was discovered and loaded, e.g. after installing a plugin in this process."""
    _entry_points.cache_clear()
    _load_entry_point.cache_clear()


def available(kind: str) -> dict[str, EntryPoint]:
    """Entry points of one kind that the allow-list admits, by name.

    When two distributions register one name, flexgen's built-in wins (else the first
    found), and a warning names both, so a plugin cannot silently replace another.
    """
    group = _check_kind(kind)
    found: dict[str, EntryPoint] = {}
    for ep in _entry_points(group):
        dist = _distribution_of(ep)
        if not _allowed(kind, ep.name, dist):
            continue
        first = found.get(ep.name)
        if first is None:
            found[ep.name] = ep
            continue
        builtin_came_second = dist == BUILTIN_DISTRIBUTION and _distribution_of(first) != BUILTIN_DISTRIBUTION
        winner, loser = (ep, first) if builtin_came_second else (first, ep)
        found[ep.name] = winner
        log.warning("%s plugin %r is registered by both %s and %s; using %s's", kind, ep.name,
                    _distribution_of(winner), _distribution_of(loser), _distribution_of(winner))
    return found


def list_plugins() -> list[PluginInfo]:
    """Every allowed plugin of every kind, sorted by kind then name."""
    return [
        PluginInfo(kind, name, _distribution_of(ep), ep.value)
        for kind in GROUPS
        for name, ep in sorted(available(kind).items())
    ]


@cache
def _load_entry_point(group: str, name: str, value: str) -> type:
    # Cached per process: every worker process loads each plugin once.
    ep = EntryPoint(name=name, value=value, group=group)
    return ep.load()


def load(kind: str, name: str) -> type:
    """The class registered under ``name`` for ``kind``; a clear error when there is none."""
    eps = available(kind)
    if name not in eps:
        names = ", ".join(sorted(eps)) or "(none)"
        raise PluginError(f"unknown {kind} plugin {name!r}; available: {names}")
    ep = eps[name]
    try:
        cls = _load_entry_point(ep.group, ep.name, ep.value)
    except Exception as exc:  # a third-party import can fail in any way
        raise PluginError(
            f"{kind} plugin {name!r} from {_distribution_of(ep)} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    log.debug("loaded %s plugin %r from %s", kind, name, ep.value)
    return cls


def check_all() -> list[tuple[PluginInfo, str | None]]:
    """Try to import every allowed plugin; pair each with its import error (or None).

    Used by ``flexgen plugins``: a plugin that fails is reported with a one-line warning and
    the rest still load.
    """
    results = []
    for info in list_plugins():
        try:
            load(info.kind, info.name)
            results.append((info, None))
        except PluginError as exc:
            log.warning("%s", exc)
            results.append((info, str(exc)))
    return results


def warn_broken() -> list[PluginInfo]:
    """Import every allowed third-party plugin; log one line for each that fails.

    Called when a run starts (as vLLM loads its plugins at start-up), so a broken package is
    reported at once; the run then goes on without it, and fails only if its config selects it.
    """
    broken = []
    for info in list_plugins():
        if info.distribution == BUILTIN_DISTRIBUTION:
            continue
        try:
            load(info.kind, info.name)
        except PluginError as exc:
            log.warning("%s; runs that do not select it go on without it", exc)
            broken.append(info)
    return broken


def parse_spec(spec: Any, where: str) -> tuple[str, dict[str, Any]]:
    """Split a config value ``name`` or ``{name: ..., **options}`` into (name, options)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise PluginError(f"{where}: a plugin given as a mapping needs a 'name' key, got {dict(spec)!r}")
        return name, options
    raise PluginError(f"{where}: expected a plugin name or {{name: ..., options}}, got {spec!r}")


def create(kind: str, spec: Any, where: str | None = None, **context: Any) -> Any:
    """Instantiate the plugin a config names: ``create("attention", {"name": "cpu"})``.

    ``context`` holds arguments the engine supplies (e.g. the compute device for storage);
    the spec's options are passed as keyword arguments after them.
    """
    where = where or f"plugins.{kind}"
    name, options = parse_spec(spec, where)
    cls = load(kind, name)
    try:
        return cls(**context, **options)
    except FlexGenError:
        raise
    except (TypeError, ValueError) as exc:  # the plugin's own verdict on its options
        raise PluginError(f"{where}: bad options for {kind} plugin {name!r}: {exc}") from exc
