"""Contract of a :class:`flexgen.models.family.ModelFamily` (entry-point group ``flexgen.models``).

What the engine, the planner and the checkpoint reader rely on, checked on a tiny config the
subclass gives (:meth:`ModelFamilyContract.make_config`), with fresh random weights:

* the family reads its own ``config.json``: ``spec_from_hf_config`` accepts it, and the spec's
  ``to_hf_config`` reads back to the same spec; a ``model_type`` it does not list is refused
  with a one-line :class:`~flexgen.errors.CheckpointError`;
* ``2 * num_layers + 2`` model layers ``[embed, attn 0, mlp 0, ..., head]``, weight names
  unique, initialisations the synthetic weights know, the embedding tables in layer 0, every
  weight with at least one checkpoint name;
* a cache geometry whose KV heads divide the query heads, and arithmetic consistent with it;
* forward shapes: queries (B, H, n, D), keys and values (B, H_kv, n, D), hidden states kept;
* incremental decoding equals recomputation: the logits of a prompt's last token after a
  prefill of all but it and one decode step equal those of a prefill of the whole prompt;
* left padding changes nothing: a padded row gives the logits it gives alone;
* a family that sets ``accepts_row_blocks`` gives the same logits when each matrix of its
  layers (embedding tables aside) is a :class:`flexgen.linear.RowBlocks`, unpacked by the
  product a few rows at a time.

A family that can build its HF counterpart should also test greedy tokens against HF
transformers (as ``tests/test_llama_math.py`` and ``tests/test_llama_engine_hf.py`` do).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flexgen import linear as linear_module
from flexgen.errors import CheckpointError
from flexgen.models.family import KVCache, ModelFamily
from flexgen.linear import RowBlocks
from flexgen.testing._random import fresh_generator


class TensorRows(RowBlocks):
    """A tensor handed over as row blocks, as the engine hands over a packed weight."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def rows_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.tensor[start:stop])

INITS = ("normal", "zeros", "ones")


class ModelFamilyContract:
    """Subclass as ``Test...``; implement :meth:`make_family` and :meth:`make_config`.

    Attributes a subclass may change: ``tolerance`` (rtol, atol) of the float32 comparisons.
    """

    tolerance: tuple[float, float] = (1e-4, 1e-4)

    def make_family(self) -> ModelFamily:
        raise NotImplementedError("subclass ModelFamilyContract and implement make_family()")

    def make_config(self) -> dict[str, Any]:
        """A tiny HF ``config.json`` dict of this family (a few layers, small sizes)."""
        raise NotImplementedError("subclass ModelFamilyContract and implement make_config()")

    @pytest.fixture
    def family(self) -> ModelFamily:
        return self.make_family()

    @pytest.fixture
    def spec(self, family: ModelFamily):
        return family.spec_from_hf_config(self.make_config(), "contract")

    # ---- helpers

    def random_layers(self, family: ModelFamily, spec, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        """Every model layer's weights: matrices N(0, 0.1²) (embeddings N(0, 1)), norms near one, biases small."""
        layers = []
        for index in range(spec.num_model_layers):
            weights = {}
            for w in family.layer_weights(spec, index):
                noise = torch.randn(w.shape, generator=gen)
                if w.init == "ones":
                    weights[w.local] = 1 + 0.1 * noise
                elif w.local in family.embedding_tables:
                    weights[w.local] = noise
                else:
                    weights[w.local] = 0.1 * noise
            layers.append(weights)
        return layers

    def logits(self, family: ModelFamily, spec, layers, ids: torch.Tensor, valid: torch.Tensor,
               split: int | None = None) -> torch.Tensor:
        """Logits after the prompt ``ids`` (B, n): one prefill, or a prefill of ``split`` tokens then decode steps."""
        n = ids.shape[1]
        split = n if split is None else split
        caches = [KVCache.empty(family.cache_geometry(spec, layer), n, ids.shape[0]) for layer in range(spec.num_layers)]
        positions = family.positions(valid)
        logits = None
        for start, stop in [(0, split)] + [(t, t + 1) for t in range(split, n)]:
            x = family.embed(spec, layers[0], ids[:, start:stop], positions[:, start:stop])
            for layer in range(spec.num_layers):
                attn, mlp = layers[2 * layer + 1], layers[2 * layer + 2]
                if start == 0:
                    x = family.attention_prefill(spec, layer, attn, x, positions[:, :stop], valid[:, :stop],
                                                 caches[layer])
                else:
                    x = family.attention_decode(spec, layer, attn, x, positions[:, start:stop], valid[:, :stop],
                                                caches[layer], start)
                x = family.mlp(spec, mlp, x)
            logits = family.head(spec, layers[-1], x)
        return logits

    # ---- reading

    def test_config_round_trips(self, family: ModelFamily, spec) -> None:
        config = self.make_config()
        assert config["model_type"] in family.model_types
        again = family.spec_from_hf_config(spec.to_hf_config(), "contract")
        assert again == spec, f"to_hf_config() then spec_from_hf_config() gives {again}, not {spec}"

    def test_foreign_model_type_is_one_line(self, family: ModelFamily) -> None:
        with pytest.raises(CheckpointError) as info:
            family.spec_from_hf_config({**self.make_config(), "model_type": "no-such-model-type"}, "contract")
        assert "\n" not in str(info.value)

    # ---- layers, weights, geometry, arithmetic

    def test_layers_and_weights(self, family: ModelFamily, spec) -> None:
        kinds = [family.layer_kind(spec, i) for i in range(spec.num_model_layers)]
        expected = [("embed", -1)] + [(k, i) for i in range(spec.num_layers) for k in ("attn", "mlp")] + [("head", -1)]
        assert kinds == expected
        names = [w.name for i in range(spec.num_model_layers) for w in family.layer_weights(spec, i)]
        assert len(names) == len(set(names)), "a weight name repeats"
        for i in range(spec.num_model_layers):
            for w in family.layer_weights(spec, i):
                assert w.init in INITS, f"{w.name}: init {w.init!r} is not one of {INITS}"
                assert family.checkpoint_names(spec, w), f"{w.name} has no checkpoint name"
        assert set(family.embedding_tables) <= {w.local for w in family.layer_weights(spec, 0)}
        assert family.parameter_count(spec) > 0

    def test_cache_geometry_and_arithmetic(self, family: ModelFamily, spec) -> None:
        for layer in range(spec.num_layers):
            geometry = family.cache_geometry(spec, layer)
            assert spec.num_heads % geometry.num_kv_heads == 0
            assert geometry.head_dim == spec.head_dim
            assert geometry.window is None or geometry.window >= 1
            assert family.cache_bytes_per_token(spec, layer, 2) == 4 * geometry.num_kv_heads * geometry.head_dim
        for index in (1, 2, spec.num_model_layers - 1):
            assert family.matmul_flops(spec, index, 3) == 3 * family.matmul_flops(spec, index, 1) > 0
        assert family.attention_flops(spec, 0, 2, 5) > 0

    # ---- forward

    def test_forward_shapes(self, family: ModelFamily, spec) -> None:
        gen, seed = fresh_generator()
        layers = self.random_layers(family, spec, gen)
        b, n = 2, 5
        ids = torch.randint(0, spec.vocab_size, (b, n), generator=gen)
        valid = torch.ones(b, n, dtype=torch.bool)
        positions = family.positions(valid)
        x = family.embed(spec, layers[0], ids, positions)
        assert tuple(x.shape) == (b, n, spec.hidden_size), f"embed: {tuple(x.shape)} (seed {seed})"
        q, k, v = family.attention_in(spec, layers[1], x, positions)
        kv_heads = family.cache_geometry(spec, 0).num_kv_heads
        assert tuple(q.shape) == (b, spec.num_heads, n, spec.head_dim)
        assert tuple(k.shape) == tuple(v.shape) == (b, kv_heads, n, spec.head_dim)
        y = family.attention_out(spec, layers[1], x, torch.zeros_like(q))
        assert tuple(family.mlp(spec, layers[2], y).shape) == (b, n, spec.hidden_size)
        assert tuple(family.head(spec, layers[-1], y).shape) == (b, spec.vocab_size)

    def test_decoding_equals_recomputation(self, family: ModelFamily, spec) -> None:
        gen, seed = fresh_generator()
        layers = self.random_layers(family, spec, gen)
        ids = torch.randint(0, spec.vocab_size, (2, 7), generator=gen)
        valid = torch.ones(2, 7, dtype=torch.bool)
        whole = self.logits(family, spec, layers, ids, valid)
        stepped = self.logits(family, spec, layers, ids, valid, split=4)
        rtol, atol = self.tolerance
        torch.testing.assert_close(stepped, whole, rtol=rtol, atol=atol, msg=lambda m: f"{m}\n(seed {seed})")

    def test_left_padding_changes_nothing(self, family: ModelFamily, spec) -> None:
        gen, seed = fresh_generator()
        layers = self.random_layers(family, spec, gen)
        row = torch.randint(0, spec.vocab_size, (1, 4), generator=gen)
        alone = self.logits(family, spec, layers, row, torch.ones(1, 4, dtype=torch.bool), split=3)
        padded = torch.cat([torch.full((1, 3), spec.pad_token_id), row], dim=1)
        valid = torch.tensor([[False] * 3 + [True] * 4])
        beside = self.logits(family, spec, layers, padded, valid, split=6)
        rtol, atol = self.tolerance
        torch.testing.assert_close(beside, alone, rtol=rtol, atol=atol, msg=lambda m: f"{m}\n(seed {seed})")

    def test_row_blocks_equal_tensors(self, family: ModelFamily, spec, monkeypatch) -> None:
        if not family.accepts_row_blocks:
            pytest.skip(f"{family.name} takes its matrices as tensors (accepts_row_blocks is False)")
        gen, seed = fresh_generator()
        layers = self.random_layers(family, spec, gen)
        as_blocks = [{name: TensorRows(t) if t.dim() == 2 and name not in family.embedding_tables else t
                      for name, t in layer.items()} for layer in layers]
        monkeypatch.setattr(linear_module, "ROW_BLOCK_BYTES", 3 * 4 * spec.hidden_size)  # a few rows per block
        ids = torch.randint(0, spec.vocab_size, (2, 6), generator=gen)
        valid = torch.ones(2, 6, dtype=torch.bool)
        expected = self.logits(family, spec, layers, ids, valid, split=4)
        got = self.logits(family, spec, as_blocks, ids, valid, split=4)
        rtol, atol = self.tolerance
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{m}\n(seed {seed})")
