"""Every user mistake is one line and exit 2, and no file of the user's changes.

A working folder holds what a user has: a checkpoint, prompts, a config, a half-finished output
of that config's job, and files of their own that a careless command might name. Each case is a
``flexgen`` command line; each must end with exit status 2 and one line on stderr naming the
key, file or value at fault, with every file in the folder byte for byte as it was and no file
added. The default run sends all cases through one Python process (:mod:`tests.cli_driver`),
which is where the time of a command goes (importing torch and Lightning); the ``slow`` run
sends each through its own ``flexgen`` process as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flexgen.config import load_config
from flexgen.predict.run import run_predict

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
model: {path: ckpt, dtype: float32}
data: {prompts: prompts.jsonl}
generation: {max_new_tokens: 2}
policy: {gpu_batch_size: 2}
output: {path: out.jsonl, offload_dir: offload}
trainer: {accelerator: cpu, enable_progress_bar: false}
"""
PROMPTS = [{"id": "p0", "input_ids": [2, 5, 6]}, {"id": "p1", "input_ids": [2, 7]}, {"id": "p2", "input_ids": [2, 9, 9, 9]}]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def damage_header(folder: Path, change) -> None:
    """Rewrite the header of the checkpoint's first shard through ``change(header) -> header``."""
    shard = sorted(folder.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = change(json.loads(raw[8:8 + n]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.fixture(scope="module")
def workdir(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    source, _ = tiny_checkpoint
    shutil.copytree(source, root / "ckpt")
    (root / "prompts.jsonl").write_text(jsonl(PROMPTS))
    (root / "c.yaml").write_text(CONFIG)
    # a finished run of the config's job, then cut to one line and a torn one: a killed run
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_predict(load_config("c.yaml"))
    finally:
        os.chdir(cwd)
    for name in ("out.jsonl.metrics.json",):
        (root / name).unlink()
    first = (root / "out.jsonl").read_text().splitlines(keepends=True)[0]
    (root / "out.jsonl").write_text(first + first[:17])
    # the user's own files
    (root / "notes.txt").write_text("my notes\nnot flexgen output\n")
    (root / "records.jsonl").write_text(jsonl([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]))
    (root / "torn.jsonl").write_text('{"id": 1, "input_ids": [2')  # no complete line, no job file
    (root / "link.jsonl").symlink_to("notes.txt")
    (root / "link_to_out.jsonl").symlink_to("out.jsonl")
    (root / "outdir").mkdir()
    (root / "mout.jsonl.metrics.json").write_text('{"mine": true}\n')
    (root / "pout.jsonl.rank1").write_text("a part file of mine\n")
    (root / "jout.jsonl.job.json").write_text('{"settings": "mine"}\n')
    done = json.loads(first)["id"]  # the prompt whose line is in the output gets other tokens
    (root / "changed.jsonl").write_text(jsonl([{**p, "input_ids": p["input_ids"] + [8]} if p["id"] == done else p
                                               for p in PROMPTS]))
    (root / "surrogate_id.jsonl").write_text('{"id": "a\\ud800", "input_ids": [2, 5]}\n')
    (root / "surrogate_text.jsonl").write_text('{"id": 1, "text": "a\\udc00b"}\n')
    (root / "long.jsonl").write_text(jsonl([{"id": 1, "input_ids": [2] * 96}]))
    # checkpoints with something wrong
    for name, damage in {
        "ckpt_shape": lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "shape": [3, 3]}},
        "ckpt_dtype": lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "dtype": "F8_E5M2"}},
        "ckpt_list": lambda h: b"[1, 2, 3]",
    }.items():
        shutil.copytree(source, root / name)
        damage_header(root / name, damage)
    shutil.copytree(source, root / "ckpt_huge")
    shard = sorted((root / "ckpt_huge").glob("*.safetensors"))[0]
    shard.write_bytes(struct.pack("<Q", 1 << 40) + shard.read_bytes()[8:])
    for name, changes in {"ckpt_heads0": dict(num_attention_heads=0), "ckpt_heads3": dict(num_attention_heads=3),
                          "ckpt_layers": dict(num_hidden_layers=1_000_000)}.items():
        shutil.copytree(source, root / name)
        edit_config(root / name, **changes)
    shutil.copytree(source, root / "ckpt_missing")
    index = json.loads((root / "ckpt_missing" / "model.safetensors.index.json").read_text())
    (root / "ckpt_missing" / next(iter(index["weight_map"].values()))).unlink()
    return root


PREDICT = ["predict", "--config", "c.yaml"]

CASES = {
    # the output and the files next to it
    "output is a text file": (PREDICT + ["output.path=notes.txt"], "notes.txt line 1 is not a flexgen output line"),
    "output is other JSON records": (PREDICT + ["output.path=records.jsonl"], "records.jsonl line 1 is not a flexgen"),
    "output is torn without a job": (PREDICT + ["output.path=torn.jsonl"], "torn.jsonl line 1 is not a flexgen output"),
    "output is a symlink": (PREDICT + ["output.path=link.jsonl"], "link.jsonl is a symbolic link"),
    "output is a symlink to an output": (PREDICT + ["output.path=link_to_out.jsonl"], "is a symbolic link"),
    "output is a folder": (PREDICT + ["output.path=outdir"], "outdir is not a file"),
    "output is the prompt file": (PREDICT + ["output.path=prompts.jsonl"], "prompts.jsonl line 1 is not a flexgen"),
    "output is the config": (PREDICT + ["output.path=c.yaml"], "c.yaml line 1 is not a flexgen output line"),
    "restart on a user's file": (PREDICT + ["--restart", "output.path=notes.txt"], "notes.txt line 1 is not a flexgen"),
    "metrics file is the user's": (PREDICT + ["output.path=mout.jsonl"], "mout.jsonl.metrics.json is not a flexgen metrics"),
    "part file is the user's": (PREDICT + ["output.path=pout.jsonl"], "pout.jsonl.rank1 line 1 is not a flexgen"),
    "job file is the user's": (PREDICT + ["output.path=jout.jsonl"], "jout.jsonl.job.json is not a flexgen job file"),
    # a resume that is not the same job
    "more new tokens": (PREDICT + ["generation.max_new_tokens=3"], "generation.max_new_tokens=2 (this run: 3)"),
    "another dtype": (PREDICT + ["model.dtype=bfloat16"], "model.dtype=float32 (this run: bfloat16)"),
    "a weight compressor": (PREDICT + ["plugins.weight_compressor=int8"], "plugins.weight_compressor=none (this run: int8)"),
    "sampling now": (PREDICT + ["generation.do_sample=true"], "generation.do_sample=false (this run: true)"),
    "another model": (PREDICT + ["model.path=ckpt_other"], "other model weights"),
    "a prompt changed": (PREDICT + ["data.prompts=changed.jsonl"], "was generated for (its token ids changed)"),
    # the command line and the config
    "override not YAML": (PREDICT + ["policy.gpu_batch_size=[1"], "override 'policy.gpu_batch_size=[1': the value is not valid YAML"),
    "override mapping not closed": (PREDICT + ["plugins.attention={name: cpu"], "the value is not valid YAML"),
    "override key with two dots": (PREDICT + ["model..path=x"], "'model..path' is not a config key"),
    "override without a value": (PREDICT + ["policy.gpu_batch_size"], "must be key=value"),
    "auto mixed with keys": (PREDICT + ["policy={auto: true, gpu_batch_size: 2}"], "policy.gpu_batch_size (on the command line) conflicts with policy.auto"),
    "YAML boolean as a folder": (PREDICT + ["output.offload_dir=off"], "'output.offload_dir' (on the command line) is the YAML boolean false"),
    "plugin refuses its option": (PREDICT + ["plugins.weight_compressor={name: int4, group_size: 0}"], "group_size must be >= 1, got 0"),
    "plugin unknown option": (PREDICT + ["plugins.attention={name: cpu, bogus: 1}"], "plugins.attention: bad options for attention plugin 'cpu'"),
    "offload folder is a file": (PREDICT + ["output.offload_dir=notes.txt", "policy.weights_gpu=0"], "output.offload_dir: " ),
    "offload folder under a file": (PREDICT + ["output.offload_dir=notes.txt/sub", "policy.cache_gpu=0"], "output.offload_dir: cannot write to"),
    "a block larger than the machine": (PREDICT + ["policy.gpu_batch_size=100000000"],
                                        "policy: a block of 1 x 100000000 sequences does not fit this machine"),
    "too many GPU batches": (PREDICT + ["policy.num_gpu_batches=10000000"], "does not fit this machine"),
    # prompts
    "id not Unicode": (PREDICT + ["data.prompts=surrogate_id.jsonl"], "surrogate_id.jsonl line 1: 'id' holds '\\ud800'"),
    "text not Unicode": (PREDICT + ["data.prompts=surrogate_text.jsonl"], "surrogate_text.jsonl line 1: 'text' holds"),
    "prompt too long": (PREDICT + ["data.prompts=long.jsonl"], "96 prompt tokens + generation.max_new_tokens 2 exceed the model's 96 positions"),
    # checkpoints
    "header shape and offsets disagree": (PREDICT + ["model.path=ckpt_shape"], "shape [3, 3] of F32 is 36 bytes"),
    "header dtype unsupported": (PREDICT + ["model.path=ckpt_dtype"], "unsupported dtype 'F8_E5M2'"),
    "header not an object": (PREDICT + ["model.path=ckpt_list"], "its header is a JSON list, not an object"),
    "header claims a terabyte": (PREDICT + ["model.path=ckpt_huge"], "claims 1099511627776 bytes"),
    "zero heads": (PREDICT + ["model.path=ckpt_heads0"], "num_attention_heads must be an integer in [1, 4096], got 0"),
    "heads not dividing hidden": (PREDICT + ["model.path=ckpt_heads3"], "hidden_size 64 is not divisible by num_attention_heads 3"),
    "a million layers, auto": (PREDICT + ["model.path=ckpt_layers", "policy=auto"], "num_hidden_layers must be an integer in [1, 1024]"),
    "a missing shard": (PREDICT + ["model.path=ckpt_missing"], "is missing"),
    # other commands
    "bench --json on a folder": (["bench", "--config", "c.yaml", "--json", "outdir"], "--json: outdir is a folder"),
    "policy on a million layers": (["policy", "--model", "ckpt_layers", "--prompt-len", "8", "--gen-len", "2",
                                    "--hardware", "t4-paper"], "num_hidden_layers must be an integer"),
}


def check(name: str, code, stderr: str, changed=(), added=()) -> None:
    expected = CASES[name][1]
    lines = stderr.strip().splitlines()
    assert code == 2, f"{name}: exit {code!r}, stderr {stderr!r}"
    assert len(lines) == 1 and lines[0].startswith("flexgen "), f"{name}: {stderr!r}"
    assert "Traceback" not in stderr and expected in lines[0], f"{name}: {lines[0]!r} lacks {expected!r}"
    assert not changed and not added, f"{name}: changed {changed}, added {added}"


def prepare_other_model(workdir: Path) -> None:
    other = workdir / "ckpt_other"
    if not other.exists():
        from tests.conftest import make_checkpoint

        make_checkpoint(other, "pre_ln", seed=3)


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "FLEXGEN_PLUGINS": "flexgen", "OMP_NUM_THREADS": "1"}


def test_every_mistake_is_one_line_and_changes_nothing(workdir):
    prepare_other_model(workdir)
    names = list(CASES)
    result = subprocess.run([sys.executable, "-m", "tests.cli_driver", json.dumps([CASES[n][0] for n in names])],
                            cwd=workdir, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("RESULTS ")]
    for name, outcome in zip(names, json.loads(line[len("RESULTS "):])):
        # files a refused command may add: none; a sweep of the offload folder adds no file either
        check(name, outcome["code"], outcome["stderr"], outcome["changed"], outcome["added"])


def test_a_refused_command_in_its_own_process(workdir):
    """The console script itself, for one case of each kind: exit status, one line, nothing changed."""
    from tests.cli_driver import fingerprint

    prepare_other_model(workdir)
    for name in ("output is a symlink", "more new tokens"):
        before = fingerprint(workdir)
        result = subprocess.run([sys.executable, "-m", "flexgen.cli", *CASES[name][0]], cwd=workdir,
                                env=environment(), capture_output=True, text=True, timeout=300)
        after = fingerprint(workdir)
        check(name, result.returncode, result.stderr, [k for k in before if after.get(k) != before[k]],
              [k for k in after if k not in before])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_each_mistake_in_its_own_process(workdir, name):
    from tests.cli_driver import fingerprint

    prepare_other_model(workdir)
    before = fingerprint(workdir)
    result = subprocess.run([sys.executable, "-m", "flexgen.cli", *CASES[name][0]], cwd=workdir, env=environment(),
                            capture_output=True, text=True, timeout=300)
    after = fingerprint(workdir)
    check(name, result.returncode, result.stderr, [k for k in before if after.get(k) != before[k]],
          [k for k in after if k not in before])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_offload_folder(workdir, capsys):
    from flexgen.cli import main

    locked = workdir / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        code = main([*PREDICT, "output.offload_dir=locked/offload", "policy.weights_gpu=0"])
    finally:
        os.chdir(cwd)
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "output.offload_dir: cannot write to" in err and "\n" not in err


@pytest.mark.parametrize("setting, expected", [
    ("HF_HUB_OFFLINE", "no-such-owner/no-such-tokenizer is neither a folder nor in the Hugging Face cache, and "
                       "HF_HUB_OFFLINE is set; download it first (hf download no-such-owner/no-such-tokenizer)"),
    ("unreachable hub", "no-such-owner/no-such-tokenizer is neither a folder nor in the Hugging Face cache, and "
                        "127.0.0.1 cannot be reached"),
])
def test_a_hub_tokenizer_without_network_is_refused_at_once(workdir, capsys, monkeypatch, setting, expected):
    """Not after transformers' minute of retries: the cache is tried, then the hub's host, once."""
    from huggingface_hub import constants

    from flexgen.cli import main

    if setting == "HF_HUB_OFFLINE":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:  # a port nothing listens on: the connection is refused at once
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(workdir)
    code = main([*PREDICT, "model.tokenizer=no-such-owner/no-such-tokenizer", "output.path=tok.jsonl"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("flexgen predict: error: model.tokenizer: "), err
    assert expected in err
    assert not (workdir / "tok.jsonl").exists()


def test_a_tokenizer_folder_that_does_not_exist(workdir, capsys, monkeypatch):
    from flexgen.cli import main

    monkeypatch.chdir(workdir)
    assert main([*PREDICT, "model.tokenizer=./no_tokenizer_here", "output.path=tok.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flexgen predict: error: model.tokenizer: folder ./no_tokenizer_here does not exist"
