"""Which model families exist, and which one reads a given checkpoint or spec.

Families are plugins (entry-point group ``flexgen.models``, :mod:`flexgen.registry`): flexgen's
own ``pyproject.toml`` registers OPT and the Llama family, and a separate package registers a
new family the same way, without a change to flexgen. Kept apart from
:mod:`flexgen.models.family` (the interface) so that the interface does not import the families
that implement it.
"""

from __future__ import annotations

from typing import Any

from flexgen import registry
from flexgen.errors import CheckpointError, PluginError
from flexgen.models.family import ModelFamily, ModelSpec


def families() -> dict[str, ModelFamily]:
    """Every registered family by name: flexgen's built-ins first, then the others, each by name, so
    that a built-in reads its model types whatever order the installed metadata lists entry points
    in (the registry caches the classes)."""
    builtin = {info.name for info in registry.list_plugins()
               if info.kind == "model" and info.distribution == registry.BUILTIN_DISTRIBUTION}
    out = {}
    for name in sorted(registry.available("model"), key=lambda name: (name not in builtin, name)):
        family = registry.load("model", name)()
        if not isinstance(family, ModelFamily):
            raise PluginError(f"model plugin {name!r} is a {type(family).__name__}, not a flexgen ModelFamily")
        out[name] = family
    return out


def family_for_config(config: dict[str, Any], name: str = "model") -> ModelFamily:
    """The family that reads an HF ``config.json`` dict; CheckpointError naming its model_type and
    listing the registered families otherwise."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    known = families().values()
    for family in known:
        if model_type in family.model_types:
            return family
    # By name: the installed metadata's order of entry points differs between installs.
    listed = "; ".join(f"{family.name} ({', '.join(family.model_types)})"
                       for family in sorted(known, key=lambda family: family.name))
    raise CheckpointError(f"{name}: config.json model_type {model_type!r} is not one flexgen runs; "
                          f"registered model families: {listed}")


def family_for_spec(spec: ModelSpec) -> ModelFamily:
    """The family a spec was made by: the one whose spec type it is exactly, else a subclass's parent."""
    known = list(families().values())
    for family in known:
        if type(spec) is family.spec_type:
            return family
    for family in known:
        if isinstance(spec, family.spec_type):
            return family
    raise TypeError(f"no model family makes specs of type {type(spec).__name__}")
