"""Which model families exist, and which one reads a given checkpoint or spec.

Kept apart from :mod:`flexgen.models.family` (the interface) so that the interface does not
import the families that implement it. (An entry-point group ``flexgen.models`` will add
third-party families here.)
"""

from __future__ import annotations

from typing import Any

from flexgen.errors import CheckpointError
from flexgen.models.family import ModelFamily, ModelSpec
from flexgen.models.llama import LlamaFamily
from flexgen.models.opt_family import OPTFamily


def families() -> dict[str, ModelFamily]:
    """The built-in families by name. (An entry-point group ``flexgen.models`` will add plugins.)"""
    return {family.name: family for family in (OPTFamily(), LlamaFamily())}


def family_for_config(config: dict[str, Any], name: str = "model") -> ModelFamily:
    """The family that reads an HF ``config.json`` dict; CheckpointError naming its model_type otherwise."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    known = families().values()
    for family in known:
        if model_type in family.model_types:
            return family
    listed = "; ".join(f"{family.name} ({', '.join(family.model_types)})" for family in known)
    raise CheckpointError(f"{name}: config.json model_type {model_type!r} is not one flexgen runs; "
                          f"registered model families: {listed}")


def family_for_spec(spec: ModelSpec) -> ModelFamily:
    """The family a spec was made by."""
    for family in families().values():
        if isinstance(spec, family.spec_type):
            return family
    raise TypeError(f"no model family makes specs of type {type(spec).__name__}")
