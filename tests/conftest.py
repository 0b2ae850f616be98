"""Shared fixtures: tiny random OPT checkpoints written by HF transformers itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexgen.testing.reference import write_random_checkpoint

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
# barriers make each small op cost milliseconds.
torch.set_num_threads(1)

# Several OPTConfig variants, so every branch of the model math is compared with HF.
CHECKPOINT_VARIANTS = {
    # pre-layer-norm with biases, like opt-125m ... opt-175b; sharded safetensors
    "pre_ln": dict(
        config=dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
                    max_position_embeddings=96),
        save=dict(max_shard_size="60KB"),
    ),
    # opt-350m's shape: post-layer-norm, input/output projections (word_embed_proj_dim != hidden)
    "post_ln_proj": dict(
        config=dict(vocab_size=300, hidden_size=48, num_hidden_layers=2, ffn_dim=96, num_attention_heads=3,
                    max_position_embeddings=80, do_layer_norm_before=False, word_embed_proj_dim=32),
        save=dict(),
    ),
    # no biases, no affine layer norms, gelu, no final layer norm; a pickled .bin checkpoint
    "no_bias_gelu_bin": dict(
        config=dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                    max_position_embeddings=64, enable_bias=False, layer_norm_elementwise_affine=False,
                    activation_function="gelu", _remove_final_layer_norm=True),
        save=dict(pickled=True),
    ),
}


@pytest.fixture
def threads():
    """Lets a test set torch's intra-op threads (``torch.set_num_threads``), given back after it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def make_checkpoint(path: Path, variant: str, seed: int = 0):
    """Write a random OPT checkpoint of one variant with HF's ``save_pretrained``; return the HF model."""
    spec = CHECKPOINT_VARIANTS[variant]
    save = dict(spec["save"])
    pickled = save.pop("pickled", False)
    model = write_random_checkpoint(path, seed=seed, save=save, **spec["config"])
    if pickled:
        # transformers 5 writes safetensors only; write the legacy pickled layout by hand,
        # without the tied lm_head, as older HF versions did.
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        torch.save(state, Path(path) / "pytorch_model.bin")
        (Path(path) / "model.safetensors").unlink()
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(path, HF model) of the default tiny checkpoint."""
    path = tmp_path_factory.mktemp("ckpt-pre_ln")
    return path, make_checkpoint(path, "pre_ln")


@pytest.fixture(scope="session")
def quickstart_cache(tmp_path_factory):
    """A private FLEXGEN_CACHE with the quickstart checkpoint, built once per test session."""
    from flexgen.models.quickstart import ensure_quickstart

    root = tmp_path_factory.mktemp("flexgen-cache")
    ensure_quickstart(root)
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
