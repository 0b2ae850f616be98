"""The Llama family's pure functions equal HF transformers, layer by layer, through the ModelFamily interface.

Tiny random models in float32: each HF model (``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``, and ``OPTForCausalLM`` through the OPT adapter) is built with random
weights, its state dict mapped through the family's checkpoint names into per-layer weight
dicts, and a left-padded prompt batch run through the family's functions: prefill, then greedy
decode steps writing a (token, batch, kv_head, dim) cache. Tokens must equal HF's
``generate(do_sample=False)`` and every step's logits be close to HF's.
"""

from __future__ import annotations

import pytest
import torch

from flexgen.errors import CheckpointError
from flexgen.models.family import (
    CacheGeometry,
    KVCache,
    ModelFamily,
    grouped_attention,
    weights_from_state_dict,
)
from flexgen.models.families import family_for_config, family_for_spec
from flexgen.models.llama import LLAMA_SIZES, LlamaFamily, LlamaSpec, rope_inv_freq
from flexgen.models.opt_family import OPTFamily

VOCAB, HIDDEN, STEPS = 64, 32, 4

LLAMA = LlamaFamily()


# --------------------------------------------------------------------------- helpers


def _hf_model(model_type: str, **overrides):
    """A tiny HF model of ``model_type`` with every parameter random (biases and norm gains too)."""
    import transformers

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "opt":
        base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=HIDDEN, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "opt": (transformers.OPTConfig, transformers.OPTForCausalLM),
    }[model_type]
    torch.manual_seed(0)
    model = model_class(config_class(**{**base, **overrides})).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=generator))
    return model


def _prompts(lengths: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of ``lengths``, left-padded: ids (B, n), valid (B, n) bool."""
    generator = torch.Generator().manual_seed(2)
    n = max(lengths)
    ids = torch.full((len(lengths), n), pad, dtype=torch.long)
    valid = torch.zeros(len(lengths), n, dtype=torch.bool)
    for row, length in enumerate(lengths):
        ids[row, n - length:] = torch.randint(3, VOCAB, (length,), generator=generator)
        valid[row, n - length:] = True
    return ids, valid


def _generate(family: ModelFamily, spec, layers: list[dict[str, torch.Tensor]], ids: torch.Tensor,
              valid: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor], list[KVCache]]:
    """Greedy generation through the family's pure functions: prefill, then one token at a time."""
    b, n = ids.shape
    caches = [KVCache.empty(family.cache_geometry(spec, layer), n + steps, b) for layer in range(spec.num_layers)]
    valid_all = torch.cat([valid, torch.ones(b, steps, dtype=torch.bool)], dim=1)
    positions = family.positions(valid_all)
    tokens, logits, step_ids, length = [], [], ids, 0
    for step in range(steps):
        count = step_ids.shape[1]
        pos = positions[:, length:length + count]
        x = family.embed(spec, layers[0], step_ids, pos)
        for index in range(1, spec.num_model_layers - 1):
            kind, layer = family.layer_kind(spec, index)
            w = layers[index]
            if kind == "mlp":
                x = family.mlp(spec, w, x)
            elif step == 0:
                x = family.attention_prefill(spec, layer, w, x, pos, valid_all[:, :n], caches[layer])
            else:
                x = family.attention_decode(spec, layer, w, x, pos, valid_all[:, :length + 1], caches[layer], length)
        out = family.head(spec, layers[-1], x)
        logits.append(out)
        token = out.argmax(-1)
        tokens.append(token)
        length += count
        step_ids = token[:, None]
    return torch.stack(tokens, dim=1), logits, caches


def _hf_generate(model, ids: torch.Tensor, valid: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.generation_config.eos_token_id = None  # never stop early: compare every step
    out = model.generate(ids, attention_mask=valid.long(), max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=model.config.pad_token_id)
    return out.sequences[:, ids.shape[1]:], list(out.logits)


def _check_against_hf(model, family: ModelFamily, lengths: list[int], per_prompt: bool = False):
    config = model.config.to_dict()
    spec = family.spec_from_hf_config(config, name="tiny")
    layers = weights_from_state_dict(family, spec, model.state_dict())
    ids, valid = _prompts(lengths, spec.pad_token_id)
    with torch.no_grad():
        tokens, logits, caches = _generate(family, spec, layers, ids, valid, STEPS)
        if per_prompt:  # each prompt alone, unpadded: the reference for batch-independent results
            rows = [_hf_generate(model, ids[r:r + 1, ids.shape[1] - n:], valid[r:r + 1, ids.shape[1] - n:], STEPS)
                    for r, n in enumerate(lengths)]
            hf_tokens = torch.cat([t for t, _ in rows])
            hf_logits = [torch.cat([lg[s] for _, lg in rows]) for s in range(STEPS)]
        else:
            hf_tokens, hf_logits = _hf_generate(model, ids, valid, STEPS)
    for step, (ours, theirs) in enumerate(zip(logits, hf_logits)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=f"logits of step {step}")
    assert tokens.tolist() == hf_tokens.tolist()
    return spec, caches


# --------------------------------------------------------------------------- HF equality

#: With head_dim 8 and theta 10000 the wavelengths are 6.3, 63, 628 and 6283 positions: one kept
#: (below 48 / 4), one blended (between 12 and 96), two divided by the factor (beyond 48 / 0.5).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 0.5, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 48}

CASES = {
    "llama": ("llama", {}),
    "llama-tied-biases": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-mqa-head-dim": ("llama", {"num_key_value_heads": 1, "head_dim": 16}),
    "llama-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-llama3": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 10000.0}),
    "mistral-window": ("mistral", {"sliding_window": 4}),
    "mistral-no-window-tied": ("mistral", {"sliding_window": None, "tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-upper-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_logits_equal_hf(case):
    model_type, overrides = CASES[case]
    spec, caches = _check_against_hf(_hf_model(model_type, **overrides), LLAMA, [7, 3, 5])
    # The cache holds only the KV heads, in the engine's (token, batch, kv_head, dim) layout.
    assert tuple(caches[0].k.shape) == (7 + STEPS, 3, spec.num_kv_heads, spec.head_dim)


def test_sliding_window_is_read_from_the_spec_as_each_class_decides():
    mistral = LLAMA.spec_from_hf_config(_hf_model("mistral", sliding_window=4).config.to_dict(), "m")
    assert [LLAMA.cache_geometry(mistral, i).window for i in range(2)] == [4, 4]
    qwen = LLAMA.spec_from_hf_config(
        _hf_model("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1).config.to_dict(), "q")
    assert [LLAMA.cache_geometry(qwen, i).window for i in range(2)] == [None, 3]
    legacy = {**qwen.to_hf_config(), "layer_types": None, "use_sliding_window": False, "sliding_window": 131072}
    assert LLAMA.spec_from_hf_config(legacy, "q").sliding_layers == ()  # Qwen2.5 configs: window off


def test_dynamic_rope_equals_hf_per_prompt_and_does_not_depend_on_batching():
    # 9 positions of 8 at the longest: prefill and every decode step past max_position_embeddings.
    model = _hf_model("llama", max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    _check_against_hf(model, LLAMA, [9, 4, 6], per_prompt=True)
    spec = LLAMA.spec_from_hf_config(model.config.to_dict(), "tiny")
    inv = rope_inv_freq(spec, torch.tensor([4, 8, 12]))
    assert torch.equal(inv[0], inv[1]) and torch.equal(inv[0], rope_inv_freq(spec))  # within max: unscaled
    assert (inv[2, 1:] < inv[0, 1:]).all()  # beyond: lower frequencies


def test_llama3_rope_matches_hf_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0,
                         rope_scaling={**LLAMA3_ROPE, "factor": 8.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192})
    spec = LLAMA.spec_from_hf_config(config.to_dict(), "tiny")
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(rope_inv_freq(spec), theirs)


def test_opt_through_the_adapter_equals_hf():
    _check_against_hf(_hf_model("opt"), OPTFamily(), [6, 2, 4])


def test_grouped_attention_equals_repeated_heads():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 3, 8, generator=generator)
    k, v = torch.randn(2, 2, 5, 8, generator=generator), torch.randn(2, 2, 5, 8, generator=generator)
    mask = torch.rand(2, 1, 3, 5, generator=generator) > 0.3
    mask[..., 0] = True
    k3, v3 = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    scores = (q @ k3.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(grouped_attention(q, k, v, mask), scores.softmax(-1) @ v3)


# --------------------------------------------------------------------------- configs and names


@pytest.mark.parametrize("size", list(LLAMA_SIZES))
def test_sizes_round_trip_through_hf_configs(size):
    import transformers

    spec = LLAMA_SIZES[size]
    config = spec.to_hf_config()
    assert LlamaSpec.from_hf_config(config, name=size) == spec
    hf_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                "qwen2": transformers.Qwen2Config}[spec.model_type]
    assert LlamaSpec.from_hf_config(hf_class(**config).to_dict(), name=size) == spec  # as transformers writes it


#: Parameter counts as published (model cards, or the sum of the released safetensors).
PUBLISHED = {
    "llama-2-7b": 6.74e9, "llama-2-70b": 68.98e9, "llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9, "llama-3.1-405b": 405.9e9, "mistral-7b": 7.24e9, "qwen2.5-0.5b": 0.494e9,
    "qwen2.5-7b": 7.62e9, "qwen2.5-14b": 14.7e9, "qwen2.5-72b": 72.7e9,
}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_synthetic_sizes_have_the_published_parameter_counts(size):
    count = LLAMA.parameter_count(LLAMA.spec_for_size(size))
    assert abs(count / PUBLISHED[size] - 1) < 0.01, count


def test_real_shapes_of_the_headline_sizes():
    s = LLAMA.spec_for_size("meta-llama/llama-3.1-8b")
    assert (s.num_kv_heads, s.head_dim, s.rope_scaling.type, s.tie_word_embeddings) == (8, 128, "llama3", False)
    assert LLAMA.cache_geometry(LLAMA.spec_for_size("qwen2.5-72b"), 0).num_kv_heads == 8
    assert LLAMA.spec_for_size("qwen2.5-7b").qkv_bias and not LLAMA.spec_for_size("qwen2.5-7b").o_bias
    assert LLAMA.cache_geometry(LLAMA.spec_for_size("mistral-7b"), 31).window == 4096
    with pytest.raises(CheckpointError, match="unknown llama size 'llama-9b'; sizes: llama-2-7b"):
        LLAMA.spec_for_size("llama-9b")


def test_checkpoint_names_follow_hf():
    spec = LLAMA.spec_for_size("qwen2.5-0.5b")  # tied
    names = {w.name: LLAMA.checkpoint_names(spec, w) for i in range(spec.num_model_layers)
             for w in LLAMA.layer_weights(spec, i)}
    assert names["layers.0.self_attn.q_proj.bias"] == ("model.layers.0.self_attn.q_proj.bias",)
    assert names["layers.23.mlp.down_proj.weight"] == ("model.layers.23.mlp.down_proj.weight",)
    assert names["lm_head.weight"] == ("lm_head.weight", "model.embed_tokens.weight")
    untied = LLAMA.spec_for_size("qwen2.5-7b")
    assert LLAMA.checkpoint_names(untied, LLAMA.layer_weights(untied, untied.num_model_layers - 1)[-1]) == (
        "lm_head.weight",)
    assert [w.local for w in LLAMA.layer_weights(spec, 1)] == [
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
        "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight"]


def test_missing_or_misshapen_weight_is_named():
    model = _hf_model("llama")
    spec = LLAMA.spec_from_hf_config(model.config.to_dict(), "tiny")
    state = dict(model.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        weights_from_state_dict(LLAMA, spec, state)
    state = dict(model.state_dict())
    state["model.norm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(3,\), config.json implies \(32,\)"):
        weights_from_state_dict(LLAMA, spec, state)


BAD_FIELDS = [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"vocab_size": -1}, "vocab_size must be an integer"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers must be an integer"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"hidden_size": 30, "head_dim": None}, "hidden_size 30 is not divisible by num_attention_heads 4"),
    ({"head_dim": 7}, "head_dim 7 is odd"),
    ({"hidden_act": "nope"}, "hidden_act 'nope'"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters.rope_type 'yarn' is not supported"),
    ({"rope_parameters": None, "rope_scaling": {"type": "longrope"}}, "rope_scaling.rope_type 'longrope'"),
    ({"rope_parameters": {"rope_type": "linear"}}, "rope_parameters.factor must be a positive number"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
     "rope_parameters.low_freq_factor must be a positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "rope_parameters.rope_theta must be"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config is not supported"),
    ({"eos_token_id": [2, 999]}, "eos_token_id must be token ids in"),
    ({"pad_token_id": 64}, "pad_token_id must be a token id in"),
    ({"max_position_embeddings": 1 << 30}, "max_position_embeddings must be an integer"),
]


@pytest.mark.parametrize("change,message", BAD_FIELDS, ids=[m.split()[0] for _, m in BAD_FIELDS])
def test_bad_config_field_is_named_in_one_line(change, message):
    config = {**_hf_model("llama").config.to_dict(), **change}
    with pytest.raises(CheckpointError) as error:
        LLAMA.spec_from_hf_config(config, name="ckpt")
    text = str(error.value)
    assert text.startswith("ckpt: config.json ") and message in text and "\n" not in text


def test_null_sizes_take_their_defaults():
    config = {**_hf_model("llama").config.to_dict(), "head_dim": None, "num_key_value_heads": None}
    spec = LLAMA.spec_from_hf_config(config, "ckpt")
    assert (spec.head_dim, spec.num_kv_heads) == (HIDDEN // 4, 4)
    assert LLAMA.spec_from_hf_config({**config, "pad_token_id": -1}, "ckpt").pad_token_id == 2  # eos pads
    del config["vocab_size"]
    with pytest.raises(CheckpointError, match="^ckpt: config.json lacks vocab_size$"):
        LLAMA.spec_from_hf_config(config, "ckpt")


def test_bad_layer_types_and_window_are_named():
    config = {**_hf_model("qwen2").config.to_dict(), "use_sliding_window": True, "sliding_window": 3,
              "layer_types": ["full_attention", "chunked"]}
    with pytest.raises(CheckpointError, match="layer_types must list"):
        LLAMA.spec_from_hf_config(config, "ckpt")
    config = {**_hf_model("mistral").config.to_dict(), "sliding_window": 0}
    with pytest.raises(CheckpointError, match="sliding_window must be an integer in"):
        LLAMA.spec_from_hf_config(config, "ckpt")


def test_families_are_found_from_configs_and_specs():
    assert isinstance(family_for_config({"model_type": "qwen2"}), LlamaFamily)
    assert isinstance(family_for_config({"model_type": "opt"}), OPTFamily)
    assert isinstance(family_for_spec(LLAMA.spec_for_size("mistral-7b")), LlamaFamily)
    assert isinstance(family_for_spec(OPTFamily().spec_for_size("opt-125m")), OPTFamily)
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not one flexgen runs"):
        family_for_config({"model_type": "gpt2"}, "ckpt")


def test_save_pretrained_files_map_through_the_names(tmp_path):
    """A tied model's safetensors omit lm_head.weight; the head is then read from the embedding."""
    from safetensors.torch import load_file

    model = _hf_model("qwen2", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state
    spec = LLAMA.spec_from_hf_config(model.config.to_dict(), "tiny")
    layers = weights_from_state_dict(LLAMA, spec, state)
    assert torch.equal(layers[-1]["lm_head.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(layers[1]["self_attn.k_proj.bias"], model.model.layers[0].self_attn.k_proj.bias)


def test_synthetic_weights_serve_llama_weight_specs():
    from flexgen.models.checkpoint import SyntheticWeights

    spec = LlamaSpec.from_hf_config(_hf_model("llama").config.to_dict(), "tiny")
    source = SyntheticWeights(spec, dtype=torch.float32)  # typed for OPTSpec today; it reads only what all specs have
    weights = {w.local: source.get(w) for w in LLAMA.layer_weights(spec, 1)}
    assert torch.equal(weights["input_layernorm.weight"], torch.ones(HIDDEN))
    assert weights["self_attn.k_proj.weight"].shape == (2 * 8, HIDDEN)


def test_sliding_window_decode_reads_only_the_window():
    """Positions before the window may hold anything (here NaN): a decode step never reads them."""
    model = _hf_model("mistral", sliding_window=4)
    spec = LLAMA.spec_from_hf_config(model.config.to_dict(), "tiny")
    w = weights_from_state_dict(LLAMA, spec, model.state_dict())[1]
    cache = KVCache.empty(LLAMA.cache_geometry(spec, 0), 10, 2)
    cache.k.normal_(), cache.v.normal_()
    cache.k[:5], cache.v[:5] = float("nan"), float("nan")  # length 8, window 4: positions 5, 6, 7 and the new 8
    x = torch.randn(2, 1, HIDDEN)
    out = LLAMA.attention_decode(spec, 0, w, x, torch.tensor([[8], [8]]), torch.ones(2, 9, dtype=torch.bool), cache, 8)
    assert torch.isfinite(out).all()


def test_grouped_attention_reads_the_cache_in_place():
    """Six query heads over two cached KV heads: views and batched products only, no copy of keys or values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    cache = KVCache.empty(CacheGeometry(num_kv_heads=2, head_dim=8), 50, 3)
    cache.k.normal_(), cache.v.normal_()
    k, v = cache.read(10, 40)
    with Ops() as ops:
        grouped_attention(torch.randn(3, 6, 1, 8), k, v, torch.ones(3, 1, 1, 30, dtype=torch.bool))
    copies = {"clone", "copy_", "_to_copy", "contiguous", "repeat", "repeat_interleave", "cat", "index_select"}
    assert "bmm" in ops.names and not copies & set(ops.names), ops.names


def test_arithmetic_helpers_reproduce_the_cost_model_for_opt_and_count_gqa():
    opt_family = OPTFamily()
    s = opt_family.spec_for_size("opt-350m")  # project_in/out: E != h
    h, ffn, V, E = s.hidden_size, s.ffn_dim, s.vocab_size, s.word_embed_proj_dim
    flops = [opt_family.matmul_flops(s, i, 3) for i in (0, 1, 2, s.num_model_layers - 1)]
    assert flops == [2 * 3 * h * E, 8 * 3 * h * h, 4 * 3 * h * ffn, 2 * 3 * (E * V + h * E)]
    assert opt_family.attention_flops(s, 0, 1, 100) == 4 * 100 * h
    assert opt_family.cache_bytes_per_token(s, 0, 2) == 2 * h * 2

    spec = LLAMA.spec_for_size("llama-3.1-8b")
    per_token = sum(LLAMA.matmul_flops(spec, i, 1) for i in range(spec.num_model_layers))
    assert per_token == 2 * (LLAMA.parameter_count(spec) - 128256 * 4096 - (2 * 32 + 1) * 4096)  # minus table, norms
    assert LLAMA.cache_bytes_per_token(spec, 0, 2) == 2 * 8 * 128 * 2  # a quarter of the query heads' size
    mistral = LLAMA.spec_for_size("mistral-7b")
    assert LLAMA.attention_flops(mistral, 0, 1, 10000) == LLAMA.attention_flops(mistral, 0, 1, 4096)
