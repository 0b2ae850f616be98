"""A model family from a separate package registers through ``flexgen.models`` and runs, flexgen unchanged.

The package (``tests/family_plugin/flexgen_plain_opt.py``) is put on ``sys.path`` with a
distribution's metadata whose entry point names it, exactly what ``pip install`` of a
third-party package leaves behind; nothing of ``flexgen/`` is edited or told about it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexgen import Policy, load_engine, registry
from flexgen.errors import CheckpointError
from flexgen.testing import ModelFamilyContract
from flexgen.testing.reference import hf_greedy, write_random_checkpoint
from tests.test_registry import fake_distribution

PACKAGE = Path(__file__).parent / "family_plugin"
PROMPTS = [[2, 15, 16, 17], [2, 40], [2, 7, 8, 9, 10, 11]]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The package importable and its entry point registered, for this test only."""
    monkeypatch.syspath_prepend(str(PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fake_distribution(tmp_path / "site", "flexgen-plain-opt",
                      '[flexgen.models]\nplain-opt = "flexgen_plain_opt:PlainOPTFamily"\n'.replace('"', ""))
    registry.refresh()
    yield tmp_path
    monkeypatch.undo()
    registry.refresh()


def plainopt_checkpoint(folder: Path):
    """An HF OPT checkpoint whose config.json says model_type plainopt; the HF model as reference."""
    model = write_random_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "plainopt"}))
    return model


def test_registered_family_runs_in_the_engine(installed):
    listed = {(p.kind, p.name): p for p in registry.list_plugins()}
    assert listed[("model", "plain-opt")].distribution == "flexgen-plain-opt"
    model = plainopt_checkpoint(installed / "ckpt")
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=50, weights_cpu=50, cache_gpu=0, cache_cpu=100)
    with load_engine(installed / "ckpt", policy=policy, device="cpu", dtype="float32",
                     offload_dir=installed / "offload") as engine:
        assert type(engine.family).__name__ == "PlainOPTFamily"
        assert engine.generate(PROMPTS, max_new_tokens=4) == hf_greedy(model, PROMPTS, 4)


def test_without_the_package_its_model_type_is_one_line_listing_families(tmp_path):
    plainopt_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as info:
        load_engine(tmp_path / "ckpt", device="cpu", dtype="float32", offload_dir=tmp_path / "offload")
    message = str(info.value)
    assert "model_type 'plainopt' is not one flexgen runs; registered model families: llama (llama, mistral, qwen2); opt (opt)" in message
    assert "\n" not in message


class TestPlainOPTContract(ModelFamilyContract):
    """The outside family meets the same contract as the built-ins, loaded through the registry."""

    @pytest.fixture
    def family(self, installed):
        return registry.create("model", "plain-opt")

    def make_config(self):
        return dict(model_type="plainopt", vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=24,
                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16, pad_token_id=1)
