"""The Llama family: Llama, Mistral and Qwen2. Shapes, weights and pure forward functions. Nothing else.

This module knows the mathematics of every model HF transformers loads as ``LlamaForCausalLM``,
``MistralForCausalLM`` or ``Qwen2ForCausalLM``: pre-norm decoder layers with RMSNorm, rotary
position embeddings (``rope_scaling`` types default, linear, dynamic and llama3),
grouped-query attention (fewer key/value heads than query heads), a SwiGLU MLP, attention
biases where the config has them (Qwen2's q/k/v, Llama's ``attention_bias``, ``mlp_bias``),
tied or untied output embeddings, and Mistral's (and Qwen2's upper layers') sliding window.
The three differ only in a few config fields, so one spec covers them and ``model_type`` says
which fields apply. Like :mod:`flexgen.models.opt` it knows nothing of tiers, streams or files:
every function takes the weights of one layer as a dict of tensors and returns tensors.

The model is cut into the same list of *model layers* as OPT:
``[embed, attn 0, mlp 0, ..., attn L-1, mlp L-1, head]``. An attention layer owns its
``input_layernorm``, an MLP layer its ``post_attention_layernorm``, the head the final ``norm``.

Two decisions that differ from a literal reading of HF:

* Left padding: positions count real tokens only (0, 1, ... from each row's first real
  token), as ``generate`` computes them from the attention mask; padding gets position 0.
* ``dynamic`` RoPE rescales its base from the current sequence length. HF takes the longest
  sequence of the whole batch; here each row uses its own length, so a prompt's tokens do not
  depend on what it is batched with (the engine splits a block into GPU batches). Each row
  equals HF's ``generate`` on that prompt alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from flexgen.errors import CheckpointError
from flexgen.linear import linear
from flexgen.models.family import CacheGeometry, ModelFamily, WeightSpec

#: The ``model_type`` values of the family, and the HF class each names.
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

#: (low, high) of each size in a ``config.json``. The published models reach 126 layers, hidden
#: size 16384, 152064 tokens and 131072 positions (Qwen2.5-1M: ~1M); the bounds leave room
#: above them while refusing a mistyped or hostile config before anything is allocated or planned.
LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1 << 12),
    "num_key_value_heads": (1, 1 << 12),
    "head_dim": (2, 1 << 12),
    "max_position_embeddings": (1, 1 << 24),
    "sliding_window": (1, 1 << 24),
    "max_window_layers": (0, 1024),
    "original_max_position_embeddings": (1, 1 << 24),
}

#: HF's default ``max_position_embeddings`` per model type, for a config that omits it.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}

#: Config fields that would change the mathematics in ways this module does not implement.
#: Present with a non-neutral value, they are refused by name rather than silently ignored.
_UNSUPPORTED = ("quantization_config",)

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _supported_activations() -> set[str]:
    from transformers.activations import ACT2FN

    return set(ACT2FN)


@dataclass(frozen=True)
class RopeScaling:
    """A ``rope_scaling`` of one of the types besides default (see :func:`rope_inv_freq`)."""

    type: str  # "linear" | "dynamic" | "llama3"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_positions: int = 8192  # llama3 only


@dataclass(frozen=True)
class LlamaSpec:
    """The shape of a Llama, Mistral or Qwen2 model, read from an HF ``config.json``."""

    model_type: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    #: Attention layers that attend to the last ``sliding_window`` positions only.
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    activation: str = "silu"
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    @property
    def num_model_layers(self) -> int:
        return 2 * self.num_layers + 2

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence token (Llama 3.1 instruct names three)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer``, None when it attends to everything."""
        return self.sliding_window if layer in self.sliding_layers else None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "llama") -> "LlamaSpec":
        """Read an HF Llama/Mistral/Qwen2 config dict; CheckpointError naming the field when it is not usable.

        Sizes must be integers within :data:`LIMITS`; flags booleans; rope scaling one of
        :data:`ROPE_TYPES` with its parameters. Both spellings of RoPE settings are read: the
        ``rope_theta`` + ``rope_scaling`` of the configs on the Hub, and the ``rope_parameters``
        that transformers 5 writes.
        """
        if not isinstance(config, dict):
            raise CheckpointError(f"{name}: config.json is not a JSON object")
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise CheckpointError(f"{name}: config.json model_type {model_type!r} is not one of the Llama family "
                                  f"({', '.join(ARCHITECTURES)})")
        for key in _UNSUPPORTED:
            if config.get(key):
                raise CheckpointError(f"{name}: config.json {key} is not supported (pre-quantized weights)")

        def size(key: str, default: Any = None, where: dict[str, Any] = config, label: str = "") -> int:
            value = where.get(key)
            value = default if value is None else value  # null means "the default", as HF reads it
            if value is None:
                raise CheckpointError(f"{name}: config.json lacks {label}{key}")
            low, high = LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CheckpointError(f"{name}: config.json {label}{key} must be an integer in [{low}, {high}], "
                                      f"got {value!r}")
            return value

        def flag(key: str, default: bool) -> bool:
            value = config.get(key, default)
            value = default if value is None else value
            if not isinstance(value, bool):
                raise CheckpointError(f"{name}: config.json {key} must be true or false, got {value!r}")
            return value

        def positive(key: str, value: Any, label: str = "") -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise CheckpointError(f"{name}: config.json {label}{key} must be a positive number, got {value!r}")
            return float(value)

        vocab = size("vocab_size")
        hidden = size("hidden_size")
        heads = size("num_attention_heads")
        kv_heads = size("num_key_value_heads", heads)
        if heads % kv_heads:
            raise CheckpointError(f"{name}: config.json num_key_value_heads {kv_heads} does not divide "
                                  f"num_attention_heads {heads}")
        if config.get("head_dim") is None and hidden % heads:
            raise CheckpointError(f"{name}: config.json hidden_size {hidden} is not divisible by "
                                  f"num_attention_heads {heads}")
        head_dim = size("head_dim", hidden // heads)
        if head_dim % 2:
            raise CheckpointError(f"{name}: config.json head_dim {head_dim} is odd; rotary embeddings rotate pairs")
        layers = size("num_hidden_layers")
        max_positions = size("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type])
        eps = positive("rms_norm_eps", config.get("rms_norm_eps", 1e-6))
        activation = config.get("hidden_act", "silu")
        if not isinstance(activation, str) or activation not in _supported_activations():
            raise CheckpointError(f"{name}: config.json hidden_act {activation!r} is not one HF transformers knows")

        theta, scaling = _read_rope(config, max_positions, name, positive, size)

        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "llama":
            qkv_bias = o_bias = flag("attention_bias", False)
            mlp_bias = flag("mlp_bias", False)
        else:
            qkv_bias = o_bias = mlp_bias = False

        window, sliding = _read_window(config, model_type, layers, name, size, flag)
        tie = flag("tie_word_embeddings", False)

        def token(key: str) -> int | None:
            value = config.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
                raise CheckpointError(f"{name}: config.json {key} must be a token id in [0, {vocab}), got {value!r}")
            return value

        eos = config.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
        eos_ids = []
        for value in eos_list:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
                raise CheckpointError(f"{name}: config.json eos_token_id must be token ids in [0, {vocab}), got {eos!r}")
            eos_ids.append(value)
        raw_pad = config.get("pad_token_id")
        # Early Llama conversions write -1 for "no padding token".
        no_pad = isinstance(raw_pad, int) and not isinstance(raw_pad, bool) and raw_pad < 0
        pad = None if no_pad else token("pad_token_id")
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=size("intermediate_size"),
            max_positions=max_positions,
            rms_norm_eps=eps,
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=tie,
            sliding_window=window,
            sliding_layers=sliding,
            activation=activation,
            # Padding is masked everywhere, so any id does; HF's generate pads with eos when no pad is set.
            pad_token_id=pad if pad is not None else (eos_ids[0] if eos_ids else 0),
            bos_token_id=token("bos_token_id"),
            eos_token_ids=tuple(eos_ids),
            name=name,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """An HF ``config.json`` dict for this shape (for synthetic checkpoints and the tests).

        RoPE settings are written as ``rope_theta`` + ``rope_scaling``, which transformers 4 and 5 both read.
        """
        config: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.activation,
            "rope_theta": self.rope_theta,
            "rope_scaling": _rope_scaling_dict(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else self.eos_token_id),
        }
        if self.model_type == "llama":
            config["attention_bias"] = self.qkv_bias
            config["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            config["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            config["use_sliding_window"] = bool(self.sliding_layers)
            config["sliding_window"] = self.sliding_window
            config["max_window_layers"] = min(self.sliding_layers, default=self.num_layers)
            config["layer_types"] = ["sliding_attention" if self.window(i) else "full_attention"
                                     for i in range(self.num_layers)]
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rope_scaling_dict(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    out: dict[str, Any] = {"rope_type": scaling.type, "factor": scaling.factor}
    if scaling.type == "llama3":
        out |= {"low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_positions}
    return out


def _read_rope(config, max_positions, name, positive, size) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    if config.get("rope_parameters") is not None:
        params, label = config["rope_parameters"], "rope_parameters."
    else:
        params, label = config.get("rope_scaling"), "rope_scaling."
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{name}: config.json {label.rstrip('.')} must be an object, got {params!r}")
    theta = positive("rope_theta", params.get("rope_theta", config.get("rope_theta", 10000.0)),
                     label if "rope_theta" in params else "")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{name}: config.json partial_rotary_factor {partial!r} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{name}: config.json {label}rope_type {rope_type!r} is not supported "
                              f"({', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    factor = positive("factor", params.get("factor"), label)
    if rope_type == "dynamic" and factor < 1:
        raise CheckpointError(f"{name}: config.json {label}factor must be at least 1 for dynamic rope, got {factor!r}")
    if rope_type != "llama3":
        return theta, RopeScaling(rope_type, factor)
    low = positive("low_freq_factor", params.get("low_freq_factor"), label)
    high = positive("high_freq_factor", params.get("high_freq_factor"), label)
    if high <= low:
        raise CheckpointError(f"{name}: config.json {label}high_freq_factor {high!r} must exceed "
                              f"low_freq_factor {low!r}")
    original = size("original_max_position_embeddings", max_positions, params, label)
    return theta, RopeScaling("llama3", factor, low, high, original)


def _read_window(config, model_type, layers, name, size, flag) -> tuple[int | None, tuple[int, ...]]:
    """(sliding window, the layers it applies to), as each HF class decides it.

    Mistral: every layer when ``sliding_window`` is set. Qwen2: only with
    ``use_sliding_window``, for the layers ``layer_types`` marks ``sliding_attention`` (or,
    without ``layer_types``, layers from ``max_window_layers`` on). Llama: never.
    """
    if model_type == "llama":
        return None, ()
    if model_type == "mistral":
        if config.get("sliding_window") is None:
            return None, ()
        return size("sliding_window"), tuple(range(layers))
    if not flag("use_sliding_window", False):
        return None, ()
    window = size("sliding_window", 4096)
    types = config.get("layer_types")
    if types is None:
        first = size("max_window_layers", 28)
        return window, tuple(range(first, layers))
    if (not isinstance(types, list) or len(types) != layers
            or any(t not in ("full_attention", "sliding_attention") for t in types)):
        raise CheckpointError(f"{name}: config.json layer_types must list 'full_attention' or 'sliding_attention' "
                              f"for each of the {layers} layers")
    return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")


# --------------------------------------------------------------------------- published sizes


def _size(name: str, model_type: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
          intermediate: int, max_positions: int, theta: float, eps: float, tie: bool = False,
          scaling: RopeScaling | None = None, window: int | None = None, bos: int | None = None,
          eos: tuple[int, ...] = ()) -> LlamaSpec:
    return LlamaSpec(
        model_type=model_type, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hidden // heads, intermediate_size=intermediate,
        max_positions=max_positions, rms_norm_eps=eps, rope_theta=theta, rope_scaling=scaling,
        qkv_bias=model_type == "qwen2", tie_word_embeddings=tie, sliding_window=window,
        sliding_layers=tuple(range(layers)) if window else (), pad_token_id=eos[0] if eos else 0,
        bos_token_id=bos, eos_token_ids=eos, name=name,
    )


_LLAMA31 = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA32 = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)

#: The published shapes (from each model's ``config.json`` on the Hub), for synthetic weights
#: and the cost model. Parameter counts: :meth:`LlamaFamily.parameter_count`.
LLAMA_SIZES: dict[str, LlamaSpec] = {
    s.name: s
    for s in [
        _size("llama-2-7b", "llama", 32000, 4096, 32, 32, 32, 11008, 4096, 10000.0, 1e-5, bos=1, eos=(2,)),
        _size("llama-2-13b", "llama", 32000, 5120, 40, 40, 40, 13824, 4096, 10000.0, 1e-5, bos=1, eos=(2,)),
        _size("llama-2-70b", "llama", 32000, 8192, 80, 64, 8, 28672, 4096, 10000.0, 1e-5, bos=1, eos=(2,)),
        _size("llama-3.2-1b", "llama", 128256, 2048, 16, 32, 8, 8192, 131072, 500000.0, 1e-5, tie=True,
              scaling=_LLAMA32, bos=128000, eos=(128001,)),
        _size("llama-3.2-3b", "llama", 128256, 3072, 28, 24, 8, 8192, 131072, 500000.0, 1e-5, tie=True,
              scaling=_LLAMA32, bos=128000, eos=(128001,)),
        _size("llama-3.1-8b", "llama", 128256, 4096, 32, 32, 8, 14336, 131072, 500000.0, 1e-5,
              scaling=_LLAMA31, bos=128000, eos=(128001,)),
        _size("llama-3.1-70b", "llama", 128256, 8192, 80, 64, 8, 28672, 131072, 500000.0, 1e-5,
              scaling=_LLAMA31, bos=128000, eos=(128001,)),
        _size("llama-3.1-405b", "llama", 128256, 16384, 126, 128, 8, 53248, 131072, 500000.0, 1e-5,
              scaling=_LLAMA31, bos=128000, eos=(128001,)),
        _size("mistral-7b", "mistral", 32000, 4096, 32, 32, 8, 14336, 32768, 10000.0, 1e-5, window=4096,
              bos=1, eos=(2,)),
        _size("mistral-7b-v0.3", "mistral", 32768, 4096, 32, 32, 8, 14336, 32768, 1000000.0, 1e-5, bos=1, eos=(2,)),
        _size("qwen2.5-0.5b", "qwen2", 151936, 896, 24, 14, 2, 4864, 32768, 1000000.0, 1e-6, tie=True,
              bos=151643, eos=(151643,)),
        _size("qwen2.5-7b", "qwen2", 152064, 3584, 28, 28, 4, 18944, 131072, 1000000.0, 1e-6,
              bos=151643, eos=(151643,)),
        _size("qwen2.5-14b", "qwen2", 152064, 5120, 48, 40, 8, 13824, 131072, 1000000.0, 1e-5,
              bos=151643, eos=(151643,)),
        _size("qwen2.5-72b", "qwen2", 152064, 8192, 80, 64, 8, 29568, 131072, 1000000.0, 1e-5,
              bos=151643, eos=(151643,)),
    ]
}


# --------------------------------------------------------------------------- weights


def _linear(prefix: str, out_dim: int, in_dim: int, bias: bool) -> list[WeightSpec]:
    specs = [WeightSpec(f"{prefix}.weight", (out_dim, in_dim), "normal")]
    if bias:
        specs.append(WeightSpec(f"{prefix}.bias", (out_dim,), "zeros"))
    return specs


def layer_weights(spec: LlamaSpec, kind: str, layer: int) -> list[WeightSpec]:
    """The weights of one model layer of ``kind`` (and decoder layer ``layer``), in a fixed order.

    Names are the HF checkpoint's minus the leading ``model.`` (``layers.3.self_attn.q_proj.weight``);
    ``lm_head.weight`` keeps its name (it has no prefix in the checkpoint).
    """
    h, q_dim, kv_dim = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    if kind == "embed":
        return [WeightSpec("embed_tokens.weight", (spec.vocab_size, h), "normal")]
    if kind == "attn":
        p = f"layers.{layer}"
        return (
            [WeightSpec(f"{p}.input_layernorm.weight", (h,), "ones")]
            + _linear(f"{p}.self_attn.q_proj", q_dim, h, spec.qkv_bias)
            + _linear(f"{p}.self_attn.k_proj", kv_dim, h, spec.qkv_bias)
            + _linear(f"{p}.self_attn.v_proj", kv_dim, h, spec.qkv_bias)
            + _linear(f"{p}.self_attn.o_proj", h, q_dim, spec.o_bias)
        )
    if kind == "mlp":
        p = f"layers.{layer}.mlp"
        i = spec.intermediate_size
        return (
            [WeightSpec(f"layers.{layer}.post_attention_layernorm.weight", (h,), "ones")]
            + _linear(f"{p}.gate_proj", i, h, spec.mlp_bias)
            + _linear(f"{p}.up_proj", i, h, spec.mlp_bias)
            + _linear(f"{p}.down_proj", h, i, spec.mlp_bias)
        )
    return [WeightSpec("norm.weight", (h,), "ones"), WeightSpec("lm_head.weight", (spec.vocab_size, h), "normal")]


def checkpoint_names(spec: LlamaSpec, weight: WeightSpec) -> tuple[str, ...]:
    """The HF state-dict keys of ``weight``: ``model.`` + its name; a tied head falls back to the embedding.

    Checkpoints of tied models usually omit ``lm_head.weight`` (``save_pretrained`` does).
    """
    if weight.name == "lm_head.weight":
        return ("lm_head.weight", "model.embed_tokens.weight") if spec.tie_word_embeddings else ("lm_head.weight",)
    return (f"model.{weight.name}",)


# --------------------------------------------------------------------------- forward


@cache
def _activation(name: str):
    """HF's own activation module for ``name`` (built once; it is called in every MLP)."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)``, the mean square taken in float32 whatever the dtype, as HF does."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` counts them under left padding: real tokens 0, 1, ...; padding 0."""
    valid = valid.long()
    return (torch.cumsum(valid, dim=1) - 1).clamp(min=0) * valid


def rope_inv_freq(spec: LlamaSpec, seq_len: torch.Tensor | None = None) -> torch.Tensor:
    """The rotary inverse frequencies (D/2,), float32; (B, D/2) for dynamic scaling given lengths ``seq_len`` (B,).

    * default: ``theta ** (-2i / D)``;
    * linear: all divided by ``factor`` (positions interpolated);
    * dynamic (NTK-aware): theta grows with the sequence once it exceeds ``max_positions``:
      ``theta * (factor * len / max - (factor - 1)) ** (D / (D - 2))``, the length of each row;
    * llama3: low frequencies (wavelength beyond ``original / low_freq_factor``) divided by
      ``factor``, high ones (below ``original / high_freq_factor``) kept, a smooth blend between.
    """
    d = spec.head_dim
    device = seq_len.device if seq_len is not None else None
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    scaling = spec.rope_scaling
    if scaling is not None and scaling.type == "dynamic" and seq_len is not None:
        length = torch.clamp(seq_len.long(), min=spec.max_positions).float()
        base = spec.rope_theta * (scaling.factor * length / spec.max_positions - (scaling.factor - 1)) ** (d / (d - 2))
        return 1.0 / (base[:, None] ** exponents)
    inv = 1.0 / (spec.rope_theta ** exponents)
    if scaling is None or scaling.type == "dynamic":
        return inv
    if scaling.type == "linear":
        return inv / scaling.factor
    # llama3
    original, low, high, factor = (scaling.original_max_positions, scaling.low_freq_factor,
                                   scaling.high_freq_factor, scaling.factor)
    wavelength = 2 * math.pi / inv
    scaled = torch.where(wavelength > original / low, inv / factor, inv)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(spec: LlamaSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, n, D) in float32 of positions (B, n): the rotation of each position's key and query."""
    dynamic = spec.rope_scaling is not None and spec.rope_scaling.type == "dynamic" and positions.numel()
    inv = rope_inv_freq(spec, positions.max(dim=1).values + 1 if dynamic else None).to(positions.device)
    if inv.dim() == 2:
        inv = inv[:, None, :]
    freqs = positions.float()[..., None] * inv
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, H, n, D) by cos/sin (B, n, D): pairs (i, i + D/2) turn by each angle."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin


#: The embedding table; a step reads a few rows of it (the engine gathers them where it lives).
EMBEDDING_TABLES = ("embed_tokens.weight",)


def embedding_rows(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows (B, n) of the token table that tokens ``input_ids`` read (positions enter at attention)."""
    return {"embed_tokens.weight": input_ids}


def embed_rows(spec: LlamaSpec, w: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token embeddings (B, n, hidden) from the gathered rows: no position embedding, RoPE does that."""
    return rows["embed_tokens.weight"]


def embed(spec: LlamaSpec, w: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings: (B, n) ids -> (B, n, hidden)."""
    return F.embedding(input_ids, w["embed_tokens.weight"])


def attention_in(spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (B, H, n, D) rotated and scaled by ``1/sqrt(D)``, keys (rotated) and values (B, H_kv, n, D).

    Keys are rotated before they are cached, so cached keys never need touching again.
    """
    x = rms_norm(x, w["input_layernorm.weight"], spec.rms_norm_eps)
    b, n, _ = x.shape
    d = spec.head_dim

    def project(name: str, heads: int) -> torch.Tensor:
        y = linear(x, w[f"self_attn.{name}.weight"], w.get(f"self_attn.{name}.bias"))
        return y.view(b, n, heads, d).transpose(1, 2)

    cos, sin = rope_cos_sin(spec, positions)
    q = apply_rope(project("q_proj", spec.num_heads), cos, sin)
    k = apply_rope(project("k_proj", spec.num_kv_heads), cos, sin)
    return q * (d**-0.5), k, project("v_proj", spec.num_kv_heads)


def attention_out(spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Output projection of attention (B, H, n, D) plus the residual ``x`` (the block's input)."""
    b, _, n, _ = attn.shape
    attn = attn.transpose(1, 2).reshape(b, n, spec.num_heads * spec.head_dim)
    return x + linear(attn, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))


def mlp(spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SwiGLU feed-forward with its residual: ``x + down(act(gate(y)) * up(y))``, ``y`` the normed ``x``."""
    y = rms_norm(x, w["post_attention_layernorm.weight"], spec.rms_norm_eps)
    gate = _activation(spec.activation)(linear(y, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias")))
    up = linear(y, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))
    return x + linear(gate * up, w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))


def head_features(spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What the output embedding multiplies: the last position of hidden states (B, n, hidden), normed."""
    return rms_norm(x[:, -1], w["norm.weight"], spec.rms_norm_eps)


def head(spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits (B, vocab) of the last position of hidden states (B, n, hidden)."""
    return linear(head_features(spec, w, x), w["lm_head.weight"])


# --------------------------------------------------------------------------- the family


class LlamaFamily(ModelFamily):
    """Llama, Mistral and Qwen2 through the :class:`ModelFamily` interface (the module's functions)."""

    name: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = tuple(ARCHITECTURES)
    spec_type: ClassVar[type] = LlamaSpec
    embedding_tables: ClassVar[tuple[str, ...]] = EMBEDDING_TABLES
    accepts_row_blocks: ClassVar[bool] = True  # every matrix goes through flexgen.linear.linear

    def spec_from_hf_config(self, config: dict[str, Any], name: str = "llama") -> LlamaSpec:
        return LlamaSpec.from_hf_config(config, name=name)

    def sizes(self) -> Mapping[str, LlamaSpec]:
        return LLAMA_SIZES

    def layer_weights(self, spec: LlamaSpec, index: int) -> list[WeightSpec]:
        return layer_weights(spec, *self.layer_kind(spec, index))

    def checkpoint_names(self, spec: LlamaSpec, weight: WeightSpec) -> tuple[str, ...]:
        return checkpoint_names(spec, weight)

    def cache_geometry(self, spec: LlamaSpec, layer: int) -> CacheGeometry:
        return CacheGeometry(spec.num_kv_heads, spec.head_dim, spec.window(layer))

    def positions(self, valid: torch.Tensor) -> torch.Tensor:
        return positions_from_mask(valid)

    def embedding_rows(self, spec: LlamaSpec, input_ids: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        return embedding_rows(input_ids)

    def embed_rows(self, spec: LlamaSpec, w: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return embed_rows(spec, w, rows)

    def attention_in(self, spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor, positions: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return attention_in(spec, w, x, positions)

    def attention_out(self, spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor,
                      attn: torch.Tensor) -> torch.Tensor:
        return attention_out(spec, w, x, attn)

    def mlp(self, spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return mlp(spec, w, x)

    def head(self, spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return head(spec, w, x)

    def head_features(self, spec: LlamaSpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return head_features(spec, w, x)
