"""The OPT model: its shapes, its weights, and pure forward functions. Nothing else.

This module knows the mathematics of every model HF transformers loads as
``OPTForCausalLM`` (the facebook/opt-* family, OPT-IML, Galactica: pre- or post-layer-norm,
optional final layer norm, optional input/output projections, with or without biases and
affine layer norms, any activation). It knows nothing of tiers, streams or files: every
function takes the weights of one layer as a dict of tensors and returns tensors.

The model is cut into a list of *model layers* the engine streams one at a time:
``[embed, attn 0, mlp 0, attn 1, mlp 1, ..., head]``. Splitting each decoder layer into its
attention and MLP halves halves the weights that must be in compute memory at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from flexgen.errors import CheckpointError
from flexgen.linear import linear

#: OPT's learned position embeddings are offset by 2 (a fairseq legacy).
POSITION_OFFSET = 2


#: (low, high) of each size in an OPT ``config.json``. The published OPTs reach 96 layers, hidden
#: size 12288 and 50272 tokens; the bounds leave ample room above them while keeping what is
#: planned (``flexgen policy``, ``policy: auto``: seconds per hundred layers) and allocated bounded.
LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1 << 12),
    "ffn_dim": (1, 1 << 18),
    "max_position_embeddings": (1, 1 << 20),
    "word_embed_proj_dim": (1, 1 << 16),
}


def _supported_activations() -> set[str]:
    from transformers.activations import ACT2FN

    return set(ACT2FN)


@dataclass(frozen=True)
class OPTSpec:
    """The shape of an OPT model, read from an HF ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_positions: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    enable_bias: bool = True
    layer_norm_affine: bool = True
    activation: str = "relu"
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    name: str = "opt"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_model_layers(self) -> int:
        return 2 * self.num_layers + 2

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "opt") -> "OPTSpec":
        """Read an HF ``OPTConfig`` dict; CheckpointError naming the field when it is not a usable OPT config.

        Sizes must be integers within :data:`LIMITS` (far above every published OPT), so that a
        mistyped or hostile ``config.json`` is refused here, before anything is allocated,
        converted or planned, rather than found out by an allocation of terabytes or a planner
        that runs for hours.
        """
        if not isinstance(config, dict):
            raise CheckpointError(f"{name}: config.json is not a JSON object")
        if config.get("model_type") != "opt":
            raise CheckpointError(f"{name}: not an OPT checkpoint (config.json model_type is {config.get('model_type')!r})")

        def size(key: str, default: Any = None) -> int:
            value = config.get(key, default)
            if value is None:
                raise CheckpointError(f"{name}: config.json lacks {key}")
            low, high = LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CheckpointError(f"{name}: config.json {key} must be an integer in [{low}, {high}], got {value!r}")
            return value

        hidden = size("hidden_size")
        vocab = size("vocab_size")
        heads = size("num_attention_heads")
        if hidden % heads:
            raise CheckpointError(f"{name}: config.json hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        activation = config.get("activation_function", "relu")
        if not isinstance(activation, str) or activation not in _supported_activations():
            raise CheckpointError(f"{name}: config.json activation_function {activation!r} is not one HF transformers knows")
        token_ids = {}
        for key, default in (("pad_token_id", 1), ("bos_token_id", 2), ("eos_token_id", 2)):
            value = config.get(key)
            value = default if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
                raise CheckpointError(f"{name}: config.json {key} must be a token id in [0, {vocab}), got {value!r}")
            token_ids[key] = value
        do_ln_before = bool(config.get("do_layer_norm_before", True))
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=size("num_hidden_layers"),
            num_heads=heads,
            ffn_dim=size("ffn_dim"),
            max_positions=size("max_position_embeddings"),
            word_embed_proj_dim=size("word_embed_proj_dim", hidden) if config.get("word_embed_proj_dim") else hidden,
            do_layer_norm_before=do_ln_before,
            final_layer_norm=do_ln_before and not config.get("_remove_final_layer_norm", False),
            enable_bias=bool(config.get("enable_bias", True)),
            layer_norm_affine=bool(config.get("layer_norm_elementwise_affine", True)),
            activation=activation,
            pad_token_id=token_ids["pad_token_id"],
            bos_token_id=token_ids["bos_token_id"],
            eos_token_id=token_ids["eos_token_id"],
            name=name,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """An HF ``config.json`` dict for this shape (used to write synthetic checkpoints)."""
        return {
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "ffn_dim": self.ffn_dim,
            "max_position_embeddings": self.max_positions,
            "word_embed_proj_dim": self.word_embed_proj_dim,
            "do_layer_norm_before": self.do_layer_norm_before,
            "_remove_final_layer_norm": self.do_layer_norm_before and not self.final_layer_norm,
            "enable_bias": self.enable_bias,
            "layer_norm_elementwise_affine": self.layer_norm_affine,
            "activation_function": self.activation,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(name, hidden, layers, heads, ffn=None, proj=None, ln_before=True) -> OPTSpec:
    return OPTSpec(
        vocab_size=50272, hidden_size=hidden, num_layers=layers, num_heads=heads, ffn_dim=ffn or 4 * hidden,
        max_positions=2048, word_embed_proj_dim=proj or hidden, do_layer_norm_before=ln_before,
        final_layer_norm=ln_before, name=name,
    )


#: The published OPT shapes, for synthetic weights and the cost model.
OPT_SIZES: dict[str, OPTSpec] = {
    s.name: s
    for s in [
        _size("opt-125m", 768, 12, 12),
        _size("opt-350m", 1024, 24, 16, proj=512, ln_before=False),
        _size("opt-1.3b", 2048, 24, 32),
        _size("opt-2.7b", 2560, 32, 32),
        _size("opt-6.7b", 4096, 32, 32),
        _size("opt-13b", 5120, 40, 40),
        _size("opt-30b", 7168, 48, 56),
        _size("opt-66b", 9216, 64, 72),
        _size("opt-175b", 12288, 96, 96),
    ]
}


def spec_for_size(name: str) -> OPTSpec:
    """The shape of a published OPT size; an error listing the sizes otherwise."""
    key = name.lower().removeprefix("facebook/")
    if key not in OPT_SIZES:
        raise CheckpointError(f"unknown OPT size {name!r}; sizes: {', '.join(OPT_SIZES)}")
    return OPT_SIZES[key]


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightSpec:
    """One weight tensor: its name in an HF checkpoint (minus ``model.decoder.``), shape, init."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "zeros" | "ones", for synthetic weights

    @property
    def local(self) -> str:
        """The name inside its model layer (``q_proj.weight``), as forward functions use it."""
        return self.name.split(".", 2)[2] if self.name.startswith("layers.") else self.name


def layer_kind(spec: OPTSpec, index: int) -> tuple[str, int]:
    """(kind, decoder layer) of model layer ``index``: ("embed", -1), ("attn", i), ("mlp", i), ("head", -1)."""
    if index == 0:
        return "embed", -1
    if index == spec.num_model_layers - 1:
        return "head", -1
    return ("attn" if index % 2 == 1 else "mlp"), (index - 1) // 2


def _linear(prefix: str, out_dim: int, in_dim: int, bias: bool) -> list[WeightSpec]:
    specs = [WeightSpec(f"{prefix}.weight", (out_dim, in_dim), "normal")]
    if bias:
        specs.append(WeightSpec(f"{prefix}.bias", (out_dim,), "zeros"))
    return specs


def _layer_norm(prefix: str, dim: int, affine: bool) -> list[WeightSpec]:
    if not affine:
        return []
    return [WeightSpec(f"{prefix}.weight", (dim,), "ones"), WeightSpec(f"{prefix}.bias", (dim,), "zeros")]


def layer_weights(spec: OPTSpec, index: int) -> list[WeightSpec]:
    """The weights of model layer ``index``, in a fixed order."""
    kind, i = layer_kind(spec, index)
    h, e, bias, affine = spec.hidden_size, spec.word_embed_proj_dim, spec.enable_bias, spec.layer_norm_affine
    if kind == "embed":
        specs = [
            WeightSpec("embed_tokens.weight", (spec.vocab_size, e), "normal"),
            WeightSpec("embed_positions.weight", (spec.max_positions + POSITION_OFFSET, h), "normal"),
        ]
        if e != h:
            specs.append(WeightSpec("project_in.weight", (h, e), "normal"))
        return specs
    if kind == "attn":
        p = f"layers.{i}"
        specs = []
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += _linear(f"{p}.self_attn.{proj}", h, h, bias)
        return specs + _layer_norm(f"{p}.self_attn_layer_norm", h, affine)
    if kind == "mlp":
        p = f"layers.{i}"
        return (
            _linear(f"{p}.fc1", spec.ffn_dim, h, bias)
            + _linear(f"{p}.fc2", h, spec.ffn_dim, bias)
            + _layer_norm(f"{p}.final_layer_norm", h, affine)
        )
    specs = _layer_norm("final_layer_norm", h, affine) if spec.final_layer_norm else []
    if e != h:
        specs.append(WeightSpec("project_out.weight", (e, h), "normal"))
    return specs + [WeightSpec("lm_head.weight", (spec.vocab_size, e), "normal")]


def weight_bytes(spec: OPTSpec, dtype: torch.dtype) -> int:
    """Bytes of all weights in ``dtype`` (the lm_head counted once more, as the engine stores it)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(
        size * _numel(w.shape) for index in range(spec.num_model_layers) for w in layer_weights(spec, index)
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------- forward


@cache
def _activation(name: str):
    """HF's own activation module for ``name`` (built once; it is called in every MLP)."""
    from transformers.activations import ACT2FN  # the exact functions HF uses

    return ACT2FN[name]


def _layer_norm_fn(spec: OPTSpec, w: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (spec.hidden_size,), w.get(f"{prefix}.weight"), w.get(f"{prefix}.bias"), eps=1e-5)


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """Position ids as OPT counts them: real tokens 0, 1, ...; padding -1."""
    valid = valid.long()
    return torch.cumsum(valid, dim=1) * valid - 1


#: The embedding tables. A step reads a few of their rows, so the engine gathers those rows
#: where a table lives rather than bringing the whole table to the compute device.
EMBEDDING_TABLES = ("embed_tokens.weight", "embed_positions.weight")


def embedding_rows(input_ids: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows (B, n) of each embedding table that tokens ``input_ids`` at ``positions`` read."""
    return {"embed_tokens.weight": input_ids, "embed_positions.weight": positions + POSITION_OFFSET}


def embed_rows(spec: OPTSpec, w: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token plus position embeddings (B, n, hidden) from the gathered rows (B, n, dim) of each table."""
    x = rows["embed_tokens.weight"]
    if "project_in.weight" in w:
        x = linear(x, w["project_in.weight"])
    return x + rows["embed_positions.weight"]


def embed(spec: OPTSpec, w: dict[str, torch.Tensor], input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token plus position embeddings: (B, n) ids -> (B, n, hidden)."""
    rows = {name: F.embedding(index, w[name]) for name, index in embedding_rows(input_ids, positions).items()}
    return embed_rows(spec, w, rows)


def attention_in(spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor):
    """Queries (scaled), keys and values, each (B, H, n, D), of hidden states (B, n, hidden)."""
    if spec.do_layer_norm_before:
        x = _layer_norm_fn(spec, w, "self_attn_layer_norm", x)
    b, n, _ = x.shape
    heads, d = spec.num_heads, spec.head_dim

    def project(name: str) -> torch.Tensor:
        y = linear(x, w[f"self_attn.{name}.weight"], w.get(f"self_attn.{name}.bias"))
        return y.view(b, n, heads, d).transpose(1, 2)

    return project("q_proj") * (d**-0.5), project("k_proj"), project("v_proj")


def attention_out(spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Output projection of attention (B, H, n, D) and the residual around the block."""
    b, _, n, _ = attn.shape
    attn = attn.transpose(1, 2).reshape(b, n, spec.hidden_size)
    x = x + linear(attn, w["self_attn.out_proj.weight"], w.get("self_attn.out_proj.bias"))
    if not spec.do_layer_norm_before:
        x = _layer_norm_fn(spec, w, "self_attn_layer_norm", x)
    return x


def mlp(spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The feed-forward block with its residual."""
    y = _layer_norm_fn(spec, w, "final_layer_norm", x) if spec.do_layer_norm_before else x
    y = _activation(spec.activation)(linear(y, w["fc1.weight"], w.get("fc1.bias")))
    x = x + linear(y, w["fc2.weight"], w.get("fc2.bias"))
    if not spec.do_layer_norm_before:
        x = _layer_norm_fn(spec, w, "final_layer_norm", x)
    return x


def head_features(spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What the output embedding multiplies: the last position of hidden states (B, n, hidden),
    normalised and projected, (B, word_embed_proj_dim)."""
    x = x[:, -1]
    if spec.final_layer_norm:
        x = _layer_norm_fn(spec, w, "final_layer_norm", x)
    if "project_out.weight" in w:
        x = linear(x, w["project_out.weight"])
    return x


def head(spec: OPTSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits (B, vocab) of the last position of hidden states (B, n, hidden)."""
    return linear(head_features(spec, w, x), w["lm_head.weight"])
