"""OPT through the :class:`~flexgen.models.family.ModelFamily` interface, without changing ``opt.py``.

Every method forwards to :mod:`flexgen.models.opt`, so the engine can be switched from calling
``opt.*`` by name to calling a family object with no change in what it computes: the same
functions run on the same tensors. OPT has as many key/value heads as query heads, no
sliding window, and learned position embeddings (so its positions enter at the embedding and
``attention_in`` ignores them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from flexgen.models import opt
from flexgen.models.family import CacheGeometry, ModelFamily, WeightSpec
from flexgen.models.opt import OPTSpec


class OPTFamily(ModelFamily):
    """The facebook/opt-* family (and all ``OPTForCausalLM`` configs): :mod:`flexgen.models.opt` unchanged."""

    name: ClassVar[str] = "opt"
    model_types: ClassVar[tuple[str, ...]] = ("opt",)
    spec_type: ClassVar[type] = OPTSpec
    embedding_tables: ClassVar[tuple[str, ...]] = opt.EMBEDDING_TABLES
    accepts_row_blocks: ClassVar[bool] = True  # every matrix goes through flexgen.linear.linear

    def spec_from_hf_config(self, config: dict[str, Any], name: str = "opt") -> OPTSpec:
        return OPTSpec.from_hf_config(config, name=name)

    def sizes(self) -> Mapping[str, OPTSpec]:
        return opt.OPT_SIZES

    def spec_for_size(self, size: str) -> OPTSpec:
        return opt.spec_for_size(size)

    def layer_kind(self, spec: OPTSpec, index: int) -> tuple[str, int]:
        return opt.layer_kind(spec, index)

    def layer_weights(self, spec: OPTSpec, index: int) -> list[WeightSpec]:
        return opt.layer_weights(spec, index)

    def checkpoint_names(self, spec: OPTSpec, weight: WeightSpec) -> tuple[str, ...]:
        """``model.decoder.`` + the name; the head is tied to the token embedding when the checkpoint omits it.

        (``checkpoint.py`` also accepts ``decoder.`` and ``model.`` prefixes; these are the names
        ``OPTForCausalLM.state_dict()`` and ``save_pretrained`` use.)
        """
        if weight.name == "lm_head.weight":
            return ("lm_head.weight", "model.decoder.embed_tokens.weight")
        return (f"model.decoder.{weight.name}",)

    def cache_geometry(self, spec: OPTSpec, layer: int) -> CacheGeometry:
        return CacheGeometry(spec.num_heads, spec.head_dim, None)

    def positions(self, valid: torch.Tensor) -> torch.Tensor:
        return opt.positions_from_mask(valid)

    def embedding_rows(self, spec: OPTSpec, input_ids: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        return opt.embedding_rows(input_ids, positions)

    def embed_rows(self, spec: OPTSpec, w: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return opt.embed_rows(spec, w, rows)

    def embed(self, spec: OPTSpec, w: dict[str, torch.Tensor], input_ids: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        return opt.embed(spec, w, input_ids, positions)

    def attention_in(self, spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor, positions: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return opt.attention_in(spec, w, x)

    def attention_out(self, spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor,
                      attn: torch.Tensor) -> torch.Tensor:
        return opt.attention_out(spec, w, x, attn)

    def mlp(self, spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return opt.mlp(spec, w, x)

    def head(self, spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return opt.head(spec, w, x)

    def head_features(self, spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return opt.head_features(spec, w, x)
