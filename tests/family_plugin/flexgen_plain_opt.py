"""A model family from outside flexgen, as a third-party package would write it (for tests/test_family_plugin.py).

``plainopt`` checkpoints are OPT models under another ``model_type``: the family reads them
with its own spec type and forwards the mathematics to the OPT family, which is enough to
show that a family registered through the ``flexgen.models`` entry-point group is found by
config.json, loaded, priced and run, with no file of flexgen changed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from flexgen.errors import CheckpointError
from flexgen.models.opt import OPTSpec
from flexgen.models.opt_family import OPTFamily


@dataclass(frozen=True)
class PlainOPTSpec(OPTSpec):
    """An OPT shape read from a ``plainopt`` config."""

    def to_hf_config(self) -> dict[str, Any]:
        return {**super().to_hf_config(), "model_type": "plainopt"}


class PlainOPTFamily(OPTFamily):
    name: ClassVar[str] = "plain-opt"
    model_types: ClassVar[tuple[str, ...]] = ("plainopt",)
    spec_type: ClassVar[type] = PlainOPTSpec

    def spec_from_hf_config(self, config: dict[str, Any], name: str = "plainopt") -> PlainOPTSpec:
        if config.get("model_type") != "plainopt":
            raise CheckpointError(f"{name}: not a plainopt checkpoint (model_type {config.get('model_type')!r})")
        spec = OPTSpec.from_hf_config({**config, "model_type": "opt"}, name=name)
        return PlainOPTSpec(**{f.name: getattr(spec, f.name) for f in fields(spec)})

    def sizes(self):
        return {}
