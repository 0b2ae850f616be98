"""The Python batch API, ``flexgen.batch_generate``: the predict run's results, in input order."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from flexgen import Completion, batch_generate
from flexgen.config import load_config
from flexgen.errors import ConfigError, PromptError
from flexgen.predict.run import run_predict
from tests.test_predict_e2e import QUICKSTART

TEXTS = ["The policy says", "FlexGen keeps", "Each block of", "A weight on disk", "The cache"]
QUIET = ["trainer.enable_progress_bar=false", "generation.max_new_tokens=10"]


@pytest.fixture
def env_cache(quickstart_cache, monkeypatch):
    monkeypatch.setenv("FLEXGEN_CACHE", str(quickstart_cache))
    return quickstart_cache


def test_results_are_flexgen_predict_lines_in_input_order(env_cache, tmp_path):
    prompts = TEXTS + [[2, 308, 441]]
    results = batch_generate(QUICKSTART, prompts, overrides=QUIET)
    assert all(isinstance(r, Completion) for r in results)
    assert [r.index for r in results] == list(range(len(prompts)))
    assert [r.prompt for r in results] == TEXTS + [None]
    assert results[-1].prompt_token_ids == [2, 308, 441]

    # the same prompts through flexgen predict: the same tokens, text and finish reasons
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS))
                    + json.dumps({"id": 5, "input_ids": [2, 308, 441]}) + "\n")
    out = tmp_path / "out.jsonl"
    run_predict(load_config(QUICKSTART, QUIET + [f"data.prompts={file}", f"output.path={out}"]))
    lines = {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}
    for r in results:
        line = lines[r.index]
        assert (r.token_ids, r.text, r.finish_reason, r.prompt_token_ids) == \
            (line["output_ids"], line["text"], line["finish_reason"], line["input_ids"])
    assert not (tmp_path / "outputs").exists(), "the batch API writes nothing of the user's"


def test_config_as_dict_or_dictconfig_and_stop_strings(env_cache):
    as_dict = OmegaConf.to_container(OmegaConf.load(QUICKSTART))
    as_dict["data"] = {}  # the prompts come from the call
    plain = batch_generate(as_dict, TEXTS[:2], overrides=QUIET)
    assert batch_generate(OmegaConf.create(as_dict), TEXTS[:2], overrides=QUIET) == plain
    assert [r.finish_reason for r in plain] == ["length", "length"]
    # a stop string from inside the first continuation: it stops there, and the text leaves it out
    stop = plain[0].text[4:7]
    stopped = batch_generate(as_dict, TEXTS[:2], overrides=QUIET + [f"generation.stop=[{json.dumps(stop)}]"])
    assert stopped[0].finish_reason == "stop" and stopped[0].text == plain[0].text[:4]
    assert len(stopped[0].token_ids) < len(plain[0].token_ids)
    assert stopped[0].token_ids == plain[0].token_ids[: len(stopped[0].token_ids)]


def test_mistakes_are_one_line_errors(env_cache):
    with pytest.raises(PromptError, match="prompts must be a list of strings"):
        batch_generate(QUICKSTART, "The policy says", overrides=QUIET)
    with pytest.raises(PromptError, match=r"prompts\[1\]: expected a string or a non-empty list of token ids"):
        batch_generate(QUICKSTART, ["ok", []], overrides=QUIET)
    with pytest.raises(ConfigError, match="trainer.devices=2 .*one device"):
        batch_generate(QUICKSTART, ["ok"], overrides=QUIET + ["trainer.devices=2"])
    with pytest.raises(ConfigError, match="overrides must be a list"):
        batch_generate(QUICKSTART, ["ok"], overrides="generation.max_new_tokens=4")
    with pytest.raises(ConfigError, match="unknown config key 'generation.max_tokens'"):
        batch_generate({"model": {"path": "builtin:quickstart"}, "generation": {"max_tokens": 3}}, ["ok"])
