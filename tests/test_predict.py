"""The predict path against a small fake engine: prompts, blocks, the writer, resume, errors.

A fake engine keeps these tests about the Lightning side and the files, fast and independent of
the engine's internals; tests/test_predict_e2e.py runs the real engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexgen.cli import main as cli_main
from flexgen.config import load_config
from flexgen.errors import ConfigError, PromptError
from flexgen.models.opt import spec_for_size
from flexgen.predict.data import PromptDataModule, Prompt, check_prompts, make_blocks, read_prompts, synthetic_prompts
from flexgen.predict.module import FlexGenPredictModule
from flexgen.predict.resolve import plan_run
from flexgen.predict.run import run_predict
from flexgen.predict.writer import repair_output, scan_output

REPO = Path(__file__).resolve().parents[1]


class FakeStats:
    def __init__(self):
        self.prompt_tokens = self.generated_tokens = 0

    def to_dict(self):
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "prefill_time_s": 0.0, "decode_time_s": 0.0, "total_throughput": 0.0}


class FakeEngine:
    """Deterministic stand-in: each output depends only on its own prompt (like greedy decoding)."""

    def __init__(self, model="opt-125m", **kwargs):
        self.spec = spec_for_size("opt-125m")
        self.kwargs = kwargs
        self.calls: list[dict] = []
        self.stats = FakeStats()
        self.closed = False
        self.weights = torch.nn.Linear(2, 2)  # something a careless Trainer could move or cast

    def generate(self, input_ids, max_new_tokens=32, return_finish_reasons=False, **kwargs):
        self.calls.append({"input_ids": [list(p) for p in input_ids], "max_new_tokens": max_new_tokens, **kwargs})
        self.stats.prompt_tokens += sum(map(len, input_ids))
        self.stats.generated_tokens += max_new_tokens * len(input_ids)
        outputs = [expected_output(p, max_new_tokens) for p in input_ids]
        return (outputs, ["length"] * len(outputs)) if return_finish_reasons else outputs

    def close(self):
        self.closed = True


def expected_output(prompt, max_new_tokens):
    return [(sum(prompt) * 31 + 7 * i) % 50000 + 4 for i in range(max_new_tokens)]


class Factory:
    """An engine factory that remembers the engine it made (or refuses to make one)."""

    def __init__(self, forbid: bool = False):
        self.engine: FakeEngine | None = None
        self.forbid = forbid

    def __call__(self, model, **kwargs):
        assert not self.forbid, "the engine should not have been loaded"
        self.engine = FakeEngine(model, **kwargs)
        return self.engine


def write_prompts(path: Path, n: int = 7, start: int = 0) -> list[dict]:
    rows = [{"id": f"p{i}", "input_ids": list(range(4, 4 + 1 + (i * 5) % 9))} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def config(tmp_path: Path, *extra: str):
    return load_config(None, [
        "model.synthetic=opt-125m", f"data.prompts={tmp_path / 'prompts.jsonl'}", f"output.path={tmp_path / 'out.jsonl'}",
        "policy.gpu_batch_size=2", "policy.num_gpu_batches=1", "generation.max_new_tokens=3",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", *extra,
    ])


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- prompts


def test_read_jsonl_and_txt(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 7, "input_ids": [5, 6]}\n\n{"input_ids": [9], "extra": 1}\n{"id": "x", "text": "hi", "input_ids": [3]}\n')
    prompts = read_prompts(p)
    assert [(q.id, q.input_ids) for q in prompts] == [(7, (5, 6)), (3, (9,)), ("x", (3,))]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"id": 7, "input_ids": [5, 6]}\r\n')  # as a Windows editor saves it
    assert [(q.id, q.input_ids) for q in read_prompts(bom)] == [(7, (5, 6))]
    t = tmp_path / "a.txt"
    t.write_text("hello\n\nworld\n")
    tok = lambda text: {"input_ids": [2] + [ord(c) for c in text]}  # noqa: E731
    assert [(q.id, q.input_ids[:2]) for q in read_prompts(t, tok)] == [(1, (2, ord("h"))), (3, (2, ord("w")))]


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"id": 1, "input_ids": [5]}\n{"id": 2, "input_ids": [5]\n', "line 2: not valid JSON"),
        ('{"id": 1, "input_ids": [5]}\n\n[1, 2]\n', "line 3: expected a JSON object"),
        ('{"id": 1}\n', "line 1: a prompt needs 'text' or 'input_ids'"),
        ('{"id": 1, "input_ids": []}\n', "line 1: 'input_ids' must be a non-empty list"),
        ('{"id": 1, "input_ids": [1, "a"]}\n', "line 1: 'input_ids' must be a non-empty list"),
        ('{"id": 1, "input_ids": [1]}\n{"id": 1, "input_ids": [2]}\n', "line 2: duplicate id 1 (first on line 1)"),
        ('{"id": [1], "input_ids": [1]}\n', "line 1: 'id' must be"),
        ('{"id": 1, "text": "hello"}\n', "line 1: a text prompt needs a tokenizer"),
        ("", "no prompts"),
    ],
)
def test_prompt_file_errors_name_file_and_line(tmp_path, content, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(PromptError) as info:
        read_prompts(p)
    assert expected in str(info.value) and "bad.jsonl" in str(info.value)


def test_missing_or_wrong_kind_of_prompt_file(tmp_path):
    with pytest.raises(ConfigError, match="data.prompts: file .*nope.jsonl not found"):
        read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "p.xlsx").write_text("a\n")
    with pytest.raises(ConfigError, match=r"\.jsonl, \.txt, \.csv"):
        read_prompts(tmp_path / "p.xlsx")


def test_check_prompts_vocab_and_positions():
    check_prompts([Prompt(1, (0, 9), "f line 1")], vocab_size=10, max_positions=6, max_new_tokens=4)
    with pytest.raises(PromptError, match="f line 1: token id 10 is outside"):
        check_prompts([Prompt(1, (0, 10), "f line 1")], vocab_size=10, max_positions=6, max_new_tokens=4)
    # as in HF, prompt + new tokens may reach positions + 1: the last new token needs no position
    check_prompts([Prompt(1, (0, 1, 2), "f line 2")], vocab_size=10, max_positions=6, max_new_tokens=4)
    with pytest.raises(PromptError, match="f line 2: 4 prompt tokens .* exceed the model's 6 positions"):
        check_prompts([Prompt(1, (0, 1, 2, 3), "f line 2")], vocab_size=10, max_positions=6, max_new_tokens=4)


def test_synthetic_prompts_are_seeded():
    a = synthetic_prompts(3, 5, vocab_size=100, seed=1)
    assert a == synthetic_prompts(3, 5, vocab_size=100, seed=1) != synthetic_prompts(3, 5, vocab_size=100, seed=2)
    assert [p.id for p in a] == [0, 1, 2] and all(len(p.input_ids) == 5 and min(p.input_ids) >= 4 for p in a)


def test_blocks_group_similar_lengths_and_keep_their_mates_on_resume():
    prompts = [Prompt(i, tuple(range(n)), "") for i, n in enumerate([5, 1, 9, 2, 5, 8, 1])]
    blocks = make_blocks(prompts, 3)
    assert [[p.id for p in b] for b in blocks] == [[1, 6, 3], [0, 4, 5], [2]]
    dm = PromptDataModule(prompts, 3, done_ids={1, 6, 3, 4})
    assert [(b["block"], b["ids"]) for b in dm.batches] == [(1, [0, 5]), (2, [2])]
    assert (dm.num_todo, dm.num_skipped) == (3, 4)
    assert [b["block"] for b in dm.predict_dataloader()] == [1, 2]


# --------------------------------------------------------------------------- output file


def test_scan_and_repair_torn_tail(tmp_path):
    out = tmp_path / "o.jsonl"
    good = '{"id": "a", "input_ids": [5], "output_ids": [1]}\n{"id": 2, "input_ids": [5], "output_ids": []}\n'
    out.write_text(good + '{"id": "c", "outp')
    state = scan_output(out)
    assert state.done_ids == {"a", 2} and state.torn_lines == 1
    repair_output(out, state)
    assert out.read_text() == good
    # garbage lines at the end (a crash can leave NUL bytes) are cut too
    out.write_bytes(good.encode() + b"\0\0\0\n\0\0")
    repair_output(out, scan_output(out))
    assert out.read_text() == good
    assert scan_output(tmp_path / "missing.jsonl").done_ids == set()


def test_bad_line_in_the_middle_is_not_repaired(tmp_path):
    out = tmp_path / "o.jsonl"
    text = '{"id": "a", "input_ids": [5], "output_ids": [1]}\nnot json\n{"id": "b", "input_ids": [5], "output_ids": [1]}\n'
    out.write_text(text)
    with pytest.raises(ConfigError, match="o.jsonl line 2 is not a flexgen output line"):
        scan_output(out)
    assert out.read_text() == text


# --------------------------------------------------------------------------- the run


def test_run_writes_every_prompt_once_and_metrics(tmp_path):
    rows = write_prompts(tmp_path / "prompts.jsonl")
    factory = Factory()
    summary = run_predict(config(tmp_path, "generation.seed=10"), engine_factory=factory)
    out = read_out(tmp_path / "out.jsonl")
    assert sorted(line["id"] for line in out) == sorted(r["id"] for r in rows)
    for line in out:
        assert line["input_ids"] == next(r["input_ids"] for r in rows if r["id"] == line["id"])
        assert line["output_ids"] == expected_output(line["input_ids"], 3)
        assert "text" not in line  # no tokenizer for a synthetic model
    engine = factory.engine
    assert engine.closed and [len(c["input_ids"]) for c in engine.calls] == [2, 2, 2, 1]
    assert [c["seed"] for c in engine.calls] == [10, 10, 10, 10]
    # each prompt's own random stream: keyed by its id (the engine mixes in its tokens)
    assert [k for c in engine.calls for k in c["keys"]] == [json.dumps(line["id"]) for line in out]
    assert engine.kwargs["device"] == "cpu" and engine.kwargs["policy"].block_size == 2
    metrics = json.loads((tmp_path / "out.jsonl.metrics.json").read_text())
    assert metrics["generated_tokens"] == 21 and metrics["prompts"]["prompts_generated"] == 7
    assert metrics["policy"]["gpu_batch_size"] == 2 and metrics["plugins"]["scheduler"] == "zigzag"
    assert metrics["config"]["generation"]["max_new_tokens"] == 3
    assert summary["prompts_generated"] == 7 and summary["tokens_generated"] == 21


def test_rerun_skips_done_prompts_and_repairs_torn_line(tmp_path):
    rows = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path)
    run_predict(cfg, engine_factory=Factory())
    full = (tmp_path / "out.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    # as if killed while writing the third line
    (tmp_path / "out.jsonl").write_text("".join(lines[:2]) + lines[2][:10])
    factory = Factory()
    summary = run_predict(cfg, engine_factory=factory)
    out = read_out(tmp_path / "out.jsonl")
    assert sorted(line["id"] for line in out) == sorted(r["id"] for r in rows)
    assert summary["prompts_skipped"] == 2 and summary["prompts_generated"] == 5
    assert sorted(map(json.dumps, out)) == sorted(map(json.dumps, map(json.loads, lines)))
    # all done: the engine is not even loaded, the file is left as it is
    before = (tmp_path / "out.jsonl").read_bytes()
    summary = run_predict(cfg, engine_factory=Factory(forbid=True))
    assert summary["prompts_generated"] == 0 and (tmp_path / "out.jsonl").read_bytes() == before


def test_trainer_never_holds_the_engine_as_a_module(tmp_path):
    engine = FakeEngine()
    module = FlexGenPredictModule(engine, {"max_new_tokens": 2, "seed": None})
    assert module.engine is engine
    assert list(module.parameters()) == [] and list(module.children()) == []
    weight = engine.weights.weight
    module.to(torch.float64)
    assert engine.weights.weight is weight and weight.dtype == torch.float32
    lines = module.predict_step({"block": 0, "ids": ["a"], "input_ids": [[5, 6]]}, 0)
    assert lines == [{"id": "a", "input_ids": [5, 6], "output_ids": expected_output([5, 6], 2), "finish_reason": "length"}]


def test_synthetic_prompts_run(tmp_path):
    cfg = load_config(None, [
        "model.synthetic=opt-125m", "data.num_prompts=5", "data.prompt_len=3", f"output.path={tmp_path / 'o.jsonl'}",
        "generation.max_new_tokens=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    ])
    run_predict(cfg, engine_factory=Factory())
    assert sorted(line["id"] for line in read_out(tmp_path / "o.jsonl")) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- CLI errors


def cli(capsys, *argv) -> tuple[int, str]:
    code = cli_main(["predict", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A config on a synthetic model with a finished output that must survive every error."""
    monkeypatch.chdir(tmp_path)
    write_prompts(tmp_path / "prompts.jsonl")
    (tmp_path / "c.yaml").write_text(
        "model: {synthetic: opt-125m}\ndata: {prompts: prompts.jsonl}\noutput: {path: out.jsonl}\n"
        "trainer: {accelerator: cpu, enable_progress_bar: false}\n"
    )
    job = plan_run(load_config(tmp_path / "c.yaml")).job.fingerprint
    (tmp_path / "out.jsonl").write_text(
        '{"id": "p0", "input_ids": [4], "output_ids": [1], "job": "%s"}\n{"id": "p1", "inp' % job)
    return tmp_path


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--config", "missing.yaml"], "config file missing.yaml not found"),
        ([], "--config"),
        (["--config", "c.yaml", "data.prompts=nope.jsonl"], "data.prompts: file nope.jsonl not found"),
        (["--config", "c.yaml", "polcy.gpu_batch_size=2"], "did you mean 'policy'"),
        (["--config", "c.yaml", "policy.gpu_batch_size=two"], "policy.gpu_batch_size"),
        (["--config", "c.yaml", "policy.cache_gpu=101"], "policy.cache_gpu"),
        (["--config", "c.yaml", "output.path=c.yaml/out.jsonl"], "output.path: cannot write"),
        (["--config", "c.yaml", "model.synthetic=null", "model.path=."], "so it is not an HF checkpoint"),
        (["--config", "c.yaml", "model.synthetic=null", "model.path=gpt2"], "is not one flexgen runs; registered model families: llama (llama, mistral, qwen2); opt (opt)"),
        (["--config", "c.yaml", "model.synthetic=null", "model.path=nowhere"], "model.path: "),
        (["--config", "c.yaml", "data.prompts=bad.jsonl"], "bad.jsonl line 2: not valid JSON"),
        (["--config", "c.yaml", "generation.max_new_tokens=5000"], "exceed the model's 2048 positions"),
        (["--config", "c.yaml", "trainer.strategy=bogus"], "trainer: "),
    ],
)
def test_cli_errors_are_one_line_and_leave_output_alone(workdir, capsys, argv, expected):
    (workdir / "gpt2").mkdir()
    (workdir / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (workdir / "bad.jsonl").write_text('{"id": 1, "input_ids": [5]}\n{"id": 2,\n')
    before = (workdir / "out.jsonl").read_bytes()
    code, err = cli(capsys, *argv)
    assert code == 2
    assert err.startswith("flexgen predict: error: ") and "\n" not in err and expected in err, err
    assert (workdir / "out.jsonl").read_bytes() == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(workdir, capsys):
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = cli(capsys, "--config", "c.yaml", "output.path=locked/out.jsonl")
    finally:
        locked.chmod(0o700)
    assert code == 2 and "output.path: cannot write" in err


def test_cli_subprocess_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flexgen.cli", "predict", "--config", str(tmp_path / "none.yaml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "none.yaml not found" in result.stderr


def test_print_config(workdir, capsys):
    assert cli_main(["predict", "--config", "c.yaml", "--print-config", "policy.gpu_batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert "gpu_batch_size: 3" in out and "synthetic: opt-125m" in out


# --------------------------------------------------------------------------- policy: auto


def test_policy_auto_uses_the_optimizer_choice(tmp_path, monkeypatch):
    import types

    from flexgen.policy import Policy

    seen = {}

    def auto_policy_for_run(spec, prompt_len, gen_len, num_prompts=None, device="auto", dtype="float16",
                            hardware=None, **caps):
        seen.update(spec=spec, prompt_len=prompt_len, gen_len=gen_len, device=device, hardware=hardware, caps=caps)
        return types.SimpleNamespace(policy=Policy(gpu_batch_size=3, weights_gpu=0, weights_cpu=100),
                                     plugins={"attention": "cpu"}, predicted_throughput=12.5)

    monkeypatch.setitem(sys.modules, "flexgen.planner.optimizer", types.SimpleNamespace(auto_policy_for_run=auto_policy_for_run))
    rows = write_prompts(tmp_path / "prompts.jsonl")
    factory = Factory()
    run_predict(config(tmp_path, "policy=auto"), engine_factory=factory)
    assert seen["prompt_len"] == max(len(r["input_ids"]) for r in rows) and seen["gen_len"] == 3
    assert seen["device"] == "cpu" and seen["hardware"] is None and seen["caps"] == {}
    assert factory.engine.kwargs["policy"].gpu_batch_size == 3
    assert factory.engine.kwargs["plugins"]["attention"] == "cpu"
    metrics = json.loads((tmp_path / "out.jsonl.metrics.json").read_text())
    assert metrics["policy_source"] == "auto" and metrics["predicted_throughput"] == 12.5
    assert len(read_out(tmp_path / "out.jsonl")) == len(rows)


def test_policy_auto_without_optimizer_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "flexgen.planner.optimizer", None)  # makes the import fail
    write_prompts(tmp_path / "prompts.jsonl")
    with pytest.raises(ConfigError, match="policy: auto needs the cost-model optimizer"):
        run_predict(config(tmp_path, "policy=auto"), engine_factory=Factory(forbid=True))


def test_progress_bar_shows_tokens_per_second(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl", n=4)
    run_predict(config(tmp_path, "trainer.enable_progress_bar=true"), engine_factory=Factory())
    captured = capsys.readouterr()
    bar = captured.err.replace("\r", "\n")
    assert "tok/s=" in bar and "4/4" in bar and "tokens=12" in bar  # prompts counted, 3 new tokens each
    assert "tok/s" not in captured.out, "stdout is for the summary"


def test_unwritable_cache_for_the_quickstart(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FLEXGEN_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "--config", str(REPO / "configs" / "quickstart.yaml"))
    assert code == 2 and "FLEXGEN_CACHE" in err and "\n" not in err


def test_second_run_on_the_same_output_is_refused(tmp_path):
    import fcntl

    write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out.jsonl"
    with open(out, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running flexgen predict does
        with pytest.raises(ConfigError, match="another flexgen predict is writing"):
            run_predict(config(tmp_path), engine_factory=Factory(forbid=True))
    run_predict(config(tmp_path), engine_factory=Factory())  # lock released: runs
    assert len(read_out(out)) == 7


def test_failed_engine_load_leaves_no_output_file(tmp_path):
    from flexgen.errors import CheckpointError

    write_prompts(tmp_path / "prompts.jsonl")

    def broken(model, **kwargs):
        raise CheckpointError("model.path: weights are truncated")

    with pytest.raises(CheckpointError):
        run_predict(config(tmp_path), engine_factory=broken)
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_leaves_the_flexgen_logger_as_it_was(workdir, capsys):
    import logging

    logger = logging.getLogger("flexgen")
    before = (logger.level, logger.propagate, list(logger.handlers))
    # fails inside the run, after the command set its logging up
    assert cli_main(["predict", "--config", "c.yaml", "data.prompts=missing.jsonl"]) == 2
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_policy_auto_plans_for_the_configured_hardware(tmp_path):
    """hardware.profile and hardware.*_memory reach the real optimizer; the metrics say what it planned for."""
    write_prompts(tmp_path / "prompts.jsonl", n=3)
    factory = Factory()
    run_predict(config(tmp_path, "policy=auto", "hardware.profile=t4-paper", "hardware.gpu_memory=2GiB",
                       "hardware.cpu_memory=64GiB"), engine_factory=factory)
    metrics = json.loads((tmp_path / "out.jsonl.metrics.json").read_text())
    assert metrics["policy_source"] == "auto"
    assert metrics["hardware"]["capacity"]["gpu"] == 2 << 30 and metrics["hardware"]["capacity"]["cpu"] == 64 << 30
    assert "t4" in metrics["hardware"]["name"] and "capped" in metrics["hardware"]["source"]
    assert factory.engine.kwargs["policy"].to_dict() == metrics["policy"]


def test_hardware_profile_in_a_config_file_is_relative_to_it(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "machine.yaml").write_text("base: t4-paper\ngpu_memory: 8GiB\n")
    (tmp_path / "sub" / "c.yaml").write_text(
        "model: {synthetic: opt-125m}\ndata: {num_prompts: 2, prompt_len: 4}\nhardware: {profile: machine.yaml}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("sub/c.yaml").hardware.profile == str(tmp_path / "sub" / "machine.yaml")
    assert load_config("sub/c.yaml", ["hardware.profile=h200"]).hardware.profile == "h200"  # a preset name stays a name


def test_options_may_come_between_overrides(tmp_path, capsys):
    """``flexgen predict --config X a=1 --print-config b=2``: options amid key=value overrides, as typed."""
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    rc = cli_main(["predict", "--config", str(config), "generation.max_new_tokens=5", "--print-config",
                   "generation.do_sample=true"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "max_new_tokens: 5" in out and "do_sample: true" in out
