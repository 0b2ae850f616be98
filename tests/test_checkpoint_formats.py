"""Checkpoints as people have them, and config.json values nobody should run.

* a ``.bin`` in PyTorch's legacy (non-zip) format loads, without running pickled code, and
  gives HF's greedy tokens; a pickle that would run code is still refused;
* prompt + new tokens may reach ``max_position_embeddings + 1``, as in HF, with HF's tokens;
* impossible or absurd config values are one line naming the field, and ``flexgen policy``
  refuses a million-layer config at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from flexgen import Policy, load_engine
from flexgen.errors import CheckpointError, PromptError
from flexgen.models.opt import OPTSpec
from flexgen.testing.reference import hf_greedy, write_random_checkpoint

PROMPTS = [[2, 15, 16, 17], [2, 40], [2, 7, 8, 9, 10, 11]]
SMALL = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
             max_position_embeddings=24)


def test_legacy_bin_loads_without_running_code(tmp_path):
    model = write_random_checkpoint(tmp_path, **SMALL)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "model.safetensors").unlink()
    with load_engine(tmp_path, policy=Policy(gpu_batch_size=2), device="cpu", dtype="float32",
                     offload_dir=tmp_path / "offload") as engine:
        assert engine.generate(PROMPTS, max_new_tokens=5) == hf_greedy(model, PROMPTS, 5)


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys):
    write_random_checkpoint(tmp_path, **SMALL)
    (tmp_path / "model.safetensors").unlink()
    for legacy in (False, True):
        torch.save({"x": _Boom()}, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match="pytorch_model.bin: truncated, corrupt or unsafe"):
            load_engine(tmp_path, device="cpu", offload_dir=tmp_path / "offload")
    assert "this must never run" not in capsys.readouterr().out


def test_positions_limit_is_hfs(tmp_path):
    model = write_random_checkpoint(tmp_path, **SMALL)
    limit = SMALL["max_position_embeddings"]
    prompts = [[2, 5, 6, 7], [2, 9]]
    new = limit + 1 - 4  # the longest prompt + new tokens = positions + 1
    with load_engine(tmp_path, policy=Policy(gpu_batch_size=2), device="cpu", dtype="float32",
                     offload_dir=tmp_path / "offload") as engine:
        assert engine.generate(prompts, max_new_tokens=new) == hf_greedy(model, prompts, new)
        with pytest.raises(PromptError, match="4 tokens \\+ max_new_tokens 22 exceed the model's 24 positions"):
            engine.generate(prompts, max_new_tokens=new + 1)


BASE = dict(model_type="opt", vocab_size=320, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
            num_attention_heads=4, max_position_embeddings=96)


@pytest.mark.parametrize("change, fault", [
    (dict(num_attention_heads=0), "num_attention_heads must be an integer in [1, 4096], got 0"),
    (dict(num_attention_heads=3), "hidden_size 64 is not divisible by num_attention_heads 3"),
    (dict(num_hidden_layers=1_000_000), "num_hidden_layers must be an integer in [1, 1024], got 1000000"),
    (dict(hidden_size=-64), "hidden_size must be an integer"),
    (dict(vocab_size="320"), "vocab_size must be an integer"),
    (dict(ffn_dim=12.5), "ffn_dim must be an integer"),
    (dict(max_position_embeddings=True), "max_position_embeddings must be an integer"),
    (dict(max_position_embeddings=None), "lacks max_position_embeddings"),
    (dict(pad_token_id=320), "pad_token_id must be a token id in [0, 320)"),
    (dict(activation_function="swish2"), "activation_function 'swish2'"),
    (dict(model_type="gpt2"), "not an OPT checkpoint"),
])
def test_impossible_config_values_are_one_line(change, fault):
    with pytest.raises(CheckpointError) as info:
        OPTSpec.from_hf_config({**BASE, **change}, name="ckpt")
    assert fault in str(info.value) and "\n" not in str(info.value)


def test_policy_refuses_a_million_layers_at_once(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "num_hidden_layers": 1_000_000}))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flexgen.cli", "policy", "--model", str(tmp_path), "--prompt-len", "8", "--gen-len", "4",
         "--hardware", "t4-paper"], capture_output=True, text=True, timeout=300,
    )
    print(f"\nflexgen policy on a million-layer config: exit {result.returncode} in {time.monotonic() - started:.1f} s")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "num_hidden_layers" in result.stderr
