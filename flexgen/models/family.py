"""ModelFamily: what the engine, the cost model and the planner need to know about a kind of model.

Today the engine, the planner (``flexgen.planner``) and the bench call ``flexgen.models.opt``
by name. A :class:`ModelFamily` is the one small interface they can call instead, so that a new
family (Llama, Mistral, Qwen2: :mod:`flexgen.models.llama`) is a new file, not an edit of the
engine. It answers:

* **reading**: which HF ``config.json`` it understands (``model_types``), the *spec* (shape) it
  reads from one, the published sizes for synthetic weights;
* **layers and weights**: the list of model layers the engine streams one at a time,
  ``[embed, attn 0, mlp 0, ..., attn L-1, mlp L-1, head]`` for every family, and each layer's
  :class:`WeightSpec` list; the names of each weight in an HF checkpoint;
* **cache geometry**: how many key/value heads of what size a layer caches, and whether it
  attends to a sliding window only (the engine sizes its (token, batch, kv_head, dim) cache
  units and its cache reads from this);
* **arithmetic** (derived, no family writes it): matrix-product and attention FLOPs and cache
  bytes per token, which the cost model now computes from OPT's formulas;
* **forward**: pure functions of one layer's weights (a dict of tensors named by
  :attr:`WeightSpec.local`) - embed, attention projections in and out, MLP, head - that know
  nothing of tiers, streams or files.

The engine keeps computing ``softmax(q kᵀ + mask) v`` through its ``AttentionBackend`` between
:meth:`ModelFamily.attention_in` and :meth:`ModelFamily.attention_out`; :func:`grouped_attention`
is the reference such a backend must equal once it takes grouped-query attention (fewer KV heads
than query heads) and a sliding window. :meth:`ModelFamily.attention_prefill` and
:meth:`ModelFamily.attention_decode` chain the three over a plain cache: the whole layer as the
tests check it against HF transformers.

Families are stateless objects; every method takes the spec, so a spec (a frozen dataclass)
can travel alone through the planner and the cost model and the family be found again from it
(:func:`flexgen.models.families.family_for_spec`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from flexgen.errors import CheckpointError
from flexgen.models.opt import WeightSpec  # one WeightSpec for every family; it may move here later

__all__ = [
    "CacheGeometry",
    "KVCache",
    "ModelFamily",
    "ModelSpec",
    "WeightSpec",
    "grouped_attention",
    "prefill_mask",
    "weights_from_state_dict",
]


class ModelSpec(Protocol):
    """What every family's spec offers the engine, the planner and the CLI (``OPTSpec`` already does)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    pad_token_id: int

    @property
    def head_dim(self) -> int: ...

    @property
    def num_model_layers(self) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...

    def to_hf_config(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CacheGeometry:
    """What one attention layer keeps per token and sequence: ``num_kv_heads × head_dim`` keys and values.

    ``window``: the layer attends to the last ``window`` positions only (Mistral's sliding
    window), so a decode step needs to read no more than that many cached positions; None for
    full attention.
    """

    num_kv_heads: int
    head_dim: int
    window: int | None = None


@dataclass
class KVCache:
    """The keys and values of one attention layer for one batch: two (token, batch, kv_head, dim) tensors.

    The layout the engine's cache units use; a plain pair here so the pure functions can be
    run and tested without the engine.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, geometry: CacheGeometry, max_tokens: int, batch: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> "KVCache":
        shape = (max_tokens, batch, geometry.num_kv_heads, geometry.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values (B, H_kv, n, D) at token positions [start, start + n)."""
        n = k.shape[2]
        self.k[start:start + n] = k.permute(2, 0, 1, 3)
        self.v[start:start + n] = v.permute(2, 0, 1, 3)

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [start, stop) as (B, H_kv, t, D) views: attention reads the cache in place, no copy."""
        return self.k[start:stop].permute(1, 2, 0, 3), self.v[start:stop].permute(1, 2, 0, 3)


# --------------------------------------------------------------------------- attention reference


def prefill_mask(valid: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean (B, 1, n, n) mask of a prompt: causal, padding keys hidden, within ``window`` when set.

    Key j is visible to query i when ``i - window < j <= i``. Cache slots and positions differ
    by the row's left padding only, so a window counted in slots is the same window counted in
    positions. Each position sees itself, so a padding query's softmax stays finite and no NaN
    reaches the cache (as ``flexgen.attention.base.prefill_mask``).
    """
    n = valid.shape[1]
    i = torch.arange(n, device=valid.device)
    visible = i[None, :] <= i[:, None]
    if window is not None:
        visible &= i[None, :] > i[:, None] - window
    mask = visible[None] & valid[:, None, :].bool()
    mask |= torch.eye(n, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q kᵀ + mask) v`` with fewer key/value heads than query heads, without copying k or v.

    ``q`` (B, H, n, D), already multiplied by ``1/sqrt(D)``; ``k``, ``v`` (B, H_kv, t, D), possibly
    strided views of the cache; ``mask`` (B, 1, n, t) bool, True where a key is visible. Query
    head ``h`` reads key/value head ``h // (H / H_kv)`` (HF's ``repeat_kv``). Instead of
    repeating the cache ``H / H_kv`` times, the queries of a group are stacked along the token
    axis, (B, H_kv, G·n, D), so one batched matrix product per KV head serves the whole group:
    the bytes of cache read are those of the KV heads only, which is the point of GQA when the
    cache is the largest thing moved. Softmax in float32.
    """
    b, heads, n, d = q.shape
    kv_heads, t = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"grouped_attention: {heads} query heads are not a multiple of {kv_heads} KV heads")
    group = heads // kv_heads
    stacked = q.reshape(b, kv_heads, group * n, d)
    scores = torch.matmul(stacked, k.transpose(-1, -2)).view(b, kv_heads, group, n, t)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs.view(b, kv_heads, group * n, t), v).view(b, heads, n, d)


# --------------------------------------------------------------------------- the interface


class ModelFamily(ABC):
    """One family of decoder-only models: its configs, layers, weights, cache geometry and math.

    Every family cuts its model into ``2 * num_layers + 2`` model layers,
    ``[embed, attn 0, mlp 0, ..., head]``, which is what the engine's schedule, its weight
    placement and the cost model already count in; only what is inside a layer differs.
    """

    #: Short name, as a plugin would be registered (``flexgen.models`` entry points).
    name: ClassVar[str]
    #: HF ``config.json`` ``model_type`` values this family reads.
    model_types: ClassVar[tuple[str, ...]]
    #: The class of its specs, so a spec finds its family again (:func:`flexgen.models.families.family_for_spec`).
    spec_type: ClassVar[type]
    #: True when the forward functions use each matrix of every model layer (the embedding
    #: tables aside) only as the weight of :func:`flexgen.linear.linear`. The engine may then hand them a
    #: :class:`flexgen.linear.RowBlocks` instead of a tensor for a matrix kept packed or in
    #: another dtype, which the product unpacks a block of rows at a time (on the CPU, a decode
    #: step's products then read the weight's packed bytes only). Off by default: a family
    #: calling ``F.linear`` or reading a weight's values directly gets tensors.
    accepts_row_blocks: ClassVar[bool] = False

    # ---- reading

    @abstractmethod
    def spec_from_hf_config(self, config: dict[str, Any], name: str) -> ModelSpec:
        """The spec of an HF ``config.json`` dict; CheckpointError naming the field it cannot use."""

    @abstractmethod
    def sizes(self) -> Mapping[str, ModelSpec]:
        """The published shapes by name (``llama-3.1-8b``), for synthetic weights and the planner."""

    def spec_for_size(self, size: str) -> ModelSpec:
        """The spec of a published size; CheckpointError listing the sizes otherwise."""
        sizes = self.sizes()
        key = size.lower().rsplit("/", 1)[-1]
        if key not in sizes:
            raise CheckpointError(f"unknown {self.name} size {size!r}; sizes: {', '.join(sizes)}")
        return sizes[key]

    # ---- layers and weights

    def layer_kind(self, spec: ModelSpec, index: int) -> tuple[str, int]:
        """(kind, decoder layer) of model layer ``index``: ("embed", -1), ("attn", i), ("mlp", i), ("head", -1)."""
        if not 0 <= index < spec.num_model_layers:
            raise IndexError(f"model layer {index} of {spec.num_model_layers}")
        if index == 0:
            return "embed", -1
        if index == spec.num_model_layers - 1:
            return "head", -1
        return ("attn" if index % 2 == 1 else "mlp"), (index - 1) // 2

    @abstractmethod
    def layer_weights(self, spec: ModelSpec, index: int) -> list[WeightSpec]:
        """The weights of model layer ``index``, in a fixed order (names without the checkpoint's prefix)."""

    @abstractmethod
    def checkpoint_names(self, spec: ModelSpec, weight: WeightSpec) -> tuple[str, ...]:
        """The keys ``weight`` may have in an HF state dict, the first present wins (a tied head falls back)."""

    def parameter_count(self, spec: ModelSpec) -> int:
        """Parameters as published: each checkpoint tensor once (a tied head shares the embedding)."""
        counted: set[str] = set()
        total = 0
        for index in range(spec.num_model_layers):
            for weight in self.layer_weights(spec, index):
                key = self.checkpoint_names(spec, weight)[-1]
                if key not in counted:
                    counted.add(key)
                    total += _numel(weight.shape)
        return total

    # ---- cache geometry

    @abstractmethod
    def cache_geometry(self, spec: ModelSpec, layer: int) -> CacheGeometry:
        """What attention layer ``layer`` (a decoder layer index) caches per token and sequence."""

    # ---- arithmetic, derived from the above (for the cost model: no family writes these)

    def matmul_flops(self, spec: ModelSpec, index: int, tokens: int) -> int:
        """FLOPs of the weight matrix products of model layer ``index`` for ``tokens`` tokens.

        Two per weight of every matrix a token passes through: all 2-D weights but the
        embedding tables (read by row); the head runs for the last position only, so give it
        one token per sequence. For OPT this is the cost model's 8·h² (attention), 4·h·ffn
        (MLP) and 2·E·V (head) per token.
        """
        return 2 * tokens * sum(_numel(w.shape) for w in self.layer_weights(spec, index)
                                if len(w.shape) == 2 and w.local not in self.embedding_tables)

    def attention_flops(self, spec: ModelSpec, layer: int, queries: int, context: int) -> int:
        """FLOPs of ``q kᵀ`` and ``p v`` for ``queries`` queries each over ``context`` keys (fewer in a window).

        Counted per query head: grouped-query attention saves cache bytes, not arithmetic.
        For a prompt pass ``context`` = the prompt length (the causal half is not subtracted,
        as the cost model's 4·s²·h does not).
        """
        window = self.cache_geometry(spec, layer).window
        keys = context if window is None else min(context, window)
        return 4 * queries * keys * spec.num_heads * spec.head_dim

    def cache_bytes_per_token(self, spec: ModelSpec, layer: int, element_size: int) -> int:
        """Bytes of keys and values one token of one sequence adds to layer ``layer``'s cache, uncompressed."""
        geometry = self.cache_geometry(spec, layer)
        return 2 * geometry.num_kv_heads * geometry.head_dim * element_size

    # ---- forward: pure functions of one layer's weights

    #: Embedding tables a step reads only a few rows of (the engine gathers rows where they live).
    embedding_tables: ClassVar[tuple[str, ...]] = ("embed_tokens.weight",)

    @abstractmethod
    def positions(self, valid: torch.Tensor) -> torch.Tensor:
        """Position ids (B, t) of left-padded sequences from their validity mask (B, t), as HF counts them."""

    @abstractmethod
    def embedding_rows(self, spec: ModelSpec, input_ids: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows (B, n) of each table in :attr:`embedding_tables` that tokens at ``positions`` read."""

    @abstractmethod
    def embed_rows(self, spec: ModelSpec, w: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states (B, n, hidden) from the gathered rows (B, n, dim) of each embedding table."""

    def embed(self, spec: ModelSpec, w: dict[str, torch.Tensor], input_ids: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, n, hidden) of tokens (B, n) at ``positions`` (B, n), with the whole tables at hand."""
        rows = {name: torch.nn.functional.embedding(index, w[name])
                for name, index in self.embedding_rows(spec, input_ids, positions).items()}
        return self.embed_rows(spec, w, rows)

    @abstractmethod
    def attention_in(self, spec: ModelSpec, w: dict[str, torch.Tensor], x: torch.Tensor, positions: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, n, D) scaled by ``1/sqrt(D)``, keys and values (B, H_kv, n, D) of hidden states (B, n, hidden).

        Keys leave already position-encoded (rotated, for RoPE families), so the cache holds
        them as attention reads them and a decode step touches only the new token.
        """

    @abstractmethod
    def attention_out(self, spec: ModelSpec, w: dict[str, torch.Tensor], x: torch.Tensor,
                      attn: torch.Tensor) -> torch.Tensor:
        """The output projection of attention (B, H, n, D) and the residual around the block, given its input ``x``."""

    @abstractmethod
    def mlp(self, spec: ModelSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The feed-forward block with its residual: (B, n, hidden) -> (B, n, hidden)."""

    @abstractmethod
    def head(self, spec: ModelSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of the last position of hidden states (B, n, hidden)."""

    def head_features(self, spec: ModelSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
        """What the output embedding ``lm_head.weight`` multiplies, (B, e), for a family whose logits
        are that product alone: the engine may then compute them a slice of the embedding's rows at
        a time, never unpacking the largest weight whole. None (the default): it unpacks the whole
        embedding and calls :meth:`head`."""
        return None

    # ---- whole attention layers over a plain cache (the reference the engine's split must equal)

    def attention_prefill(self, spec: ModelSpec, layer: int, w: dict[str, torch.Tensor], x: torch.Tensor,
                          positions: torch.Tensor, valid: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Attention layer ``layer`` over a left-padded prompt (B, n); writes its keys and values at [0, n)."""
        q, k, v = self.attention_in(spec, w, x, positions)
        cache.write(0, k, v)
        attn = grouped_attention(q, k, v, prefill_mask(valid, self.cache_geometry(spec, layer).window))
        return self.attention_out(spec, w, x, attn)

    def attention_decode(self, spec: ModelSpec, layer: int, w: dict[str, torch.Tensor], x: torch.Tensor,
                         positions: torch.Tensor, valid: torch.Tensor, cache: KVCache, length: int) -> torch.Tensor:
        """Attention of one new token (B, 1) after ``length`` cached positions; writes its key and value at ``length``.

        ``valid`` (B, length + 1). With a sliding window only the last ``window`` positions are
        read from the cache: a view, never the whole prefix.
        """
        q, k, v = self.attention_in(spec, w, x, positions)
        cache.write(length, k, v)
        window = self.cache_geometry(spec, layer).window
        start = 0 if window is None else max(0, length + 1 - window)
        keys, values = cache.read(start, length + 1)
        mask = valid[:, None, None, start:length + 1].bool()
        return self.attention_out(spec, w, x, grouped_attention(q, keys, values, mask))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def weights_from_state_dict(family: ModelFamily, spec: ModelSpec, state_dict: Mapping[str, torch.Tensor],
                            ) -> list[dict[str, torch.Tensor]]:
    """The weights of every model layer, ``{local name: tensor}``, from an HF state dict (views, no copies).

    CheckpointError naming the first weight missing or of the wrong shape. The engine reads a
    checkpoint tensor by tensor instead (``checkpoint.py``); this is the same mapping at once.
    """
    layers = []
    for index in range(spec.num_model_layers):
        weights = {}
        for weight in family.layer_weights(spec, index):
            key = next((k for k in family.checkpoint_names(spec, weight) if k in state_dict), None)
            if key is None:
                raise CheckpointError(f"{spec.name}: weight {family.checkpoint_names(spec, weight)[0]!r} is missing")
            tensor = state_dict[key]
            if tuple(tensor.shape) != weight.shape:
                raise CheckpointError(f"{spec.name}: weight {key!r} has shape {tuple(tensor.shape)}, "
                                      f"config.json implies {weight.shape}")
            weights[weight.local] = tensor
        layers.append(weights)
    return layers


# --------------------------------------------------------------------------- finding a family


