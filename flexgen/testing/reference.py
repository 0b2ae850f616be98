"""HF transformers as the reference: tiny random checkpoints and greedy outputs to compare with.

For tests of anything that can change what the model computes (an attention backend, a
compressor, a storage tier): write a random OPT checkpoint with HF's own ``save_pretrained``,
run FlexGen on it, and require HF's greedy tokens::

    from flexgen.testing.reference import hf_greedy, round_tripped, write_random_checkpoint

    model = write_random_checkpoint(tmp_path, hidden_size=64, num_hidden_layers=2)
    expected = hf_greedy(round_tripped(model, my_compressor), prompts, max_new_tokens=8)

An approximation (a compressed cache, sparse attention) cannot be held to exact tokens;
:func:`agreement` with an exact run is the figure such tests print.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

#: A small OPT shape; keyword arguments of :func:`write_random_checkpoint` override it.
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
    max_position_embeddings=96,
)


def write_random_checkpoint(path: str | Path, seed: int = 0, save: dict[str, Any] | None = None, **config: Any):
    """Write a random ``OPTForCausalLM`` to ``path`` with ``save_pretrained``; return the model.

    Weights are wider than OPT's N(0, 0.02) initialisation (embeddings N(0, 1), matrices
    N(0, 0.25²)): logits then have clear winners, so greedy tokens compare meaningfully
    instead of hovering on near-ties. ``save`` is passed to ``save_pretrained``.
    """
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**{**TINY_CONFIG, **config})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 1.0 if "embed" in name else 0.25)
    model.save_pretrained(path, **(save or {}))
    return model


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int = 1) -> list[list[int]]:
    """HF's greedy ``generate`` over left-padded prompts: the new tokens of each.

    End-of-sequence is switched off, so every sequence runs the full length, as FlexGen does
    without a stop token (``min_new_tokens`` would instead forbid that token, which changes
    the outputs).
    """
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    # Set on the model itself: a generation_config passed to generate() gets its unset fields
    # filled back in from the model's defaults.
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_token_id)
    finally:
        model.generation_config.eos_token_id = eos
    return out[:, longest:].tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of generated tokens equal position by position in two runs' outputs."""
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
    return sum(x == y for x, y in pairs) / len(pairs)


def round_tripped(model, compressor):
    """A copy of ``model`` whose weights of ndim >= 2 went through compress then decompress.

    Those are exactly the tensors FlexGen's engine compresses (token and position embeddings,
    every linear weight, lm_head, tied to embed_tokens so it follows); 1-D biases and layer
    norms stay as they are.
    """
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for param in quantized.parameters():
            if param.dim() >= 2:
                parts = compressor.compress(param.data)
                param.copy_(compressor.decompress(parts, tuple(param.shape), param.dtype))
    return quantized
