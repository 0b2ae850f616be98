"""Several processes (``trainer.devices=2 trainer.strategy=ddp``) on the CPU, with gloo.

* two processes write the same lines as one, id by id, each prompt once, no part file left;
  the metrics add the ranks up;
* a two-process run killed with SIGKILL mid-way (every process of it) and started again ends
  with every prompt once and the same lines, whichever rank had written what;
* the pieces: block shares, leftover part files, aggregated figures, the GPU memory cap.

The two-process runs go through the command line in a subprocess: Lightning's ``ddp`` launcher
starts the second process by running the same command again (from pytest it would re-run
pytest). One thread per process: the machine has two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexgen.config import load_config
from flexgen.predict.data import Prompt, PromptDataModule
from flexgen.predict.distributed import aggregate_stats, cap_gpu_memory
from flexgen.predict.resolve import plan_run
from flexgen.predict.run import run_predict
from flexgen.predict.writer import leftover_parts, part_path

from tests.test_predict import Factory, config, expected_output, read_out, write_prompts
from tests.test_predict_e2e import QUICKSTART
from tests.test_predict_e2e import read_lines as by_id

TWO = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
# One block per prompt and long outputs: a run lasts long enough to be killed mid-way.
SLOW = ["policy.gpu_batch_size=1", "policy.num_gpu_batches=1", "generation.max_new_tokens=64", "generation.stop=null",
        "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def reference(quickstart_cache, tmp_path_factory):
    """The quickstart's lines from one process (in this process)."""
    out = tmp_path_factory.mktemp("reference") / "one.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLEXGEN_CACHE", str(quickstart_cache))
        run_predict(load_config(QUICKSTART, SLOW + [f"output.path={out}"]))
    return by_id(out)


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flexgen.cli", "predict", "--config", str(QUICKSTART), *SLOW, *TWO, *extra,
            f"output.path={out}"]


def environment(cache: Path) -> dict:
    return {**os.environ, "FLEXGEN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def test_two_processes_write_what_one_does(quickstart_cache, reference, tmp_path):
    out = tmp_path / "two.jsonl"
    result = subprocess.run(command(out), cwd=tmp_path, env=environment(quickstart_cache), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert by_id(out) == reference
    assert leftover_parts(out) == []
    assert result.stdout.count("flexgen predict:") == 1  # rank 0 alone prints the summary
    metrics = json.loads(Path(f"{out}.metrics.json").read_text())
    ranks = metrics["ranks"]
    assert metrics["world_size"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    assert all(r["prompts_generated"] > 0 for r in ranks)
    assert sum(r["prompts_generated"] for r in ranks) == metrics["prompts"]["prompts_generated"] == len(reference)
    assert metrics["generated_tokens"] == sum(r["stats"]["generated_tokens"] for r in ranks) == 64 * len(reference)
    longest = max(r["stats"]["prefill_time_s"] + r["stats"]["decode_time_s"] for r in ranks)
    assert metrics["total_throughput"] == pytest.approx(metrics["generated_tokens"] / longest)
    print(f"\n1 process: see the reference run; 2 processes: {metrics['total_throughput']:.0f} tok/s engine, "
          f"{metrics['wall_throughput']:.0f} tok/s over the loop")


def test_ddp_spawn_writes_the_same(quickstart_cache, reference, tmp_path):
    """``ddp_spawn``: the processes are spawned from trainer.predict; the parent prints rank 0's summary."""
    out = tmp_path / "spawn.jsonl"
    result = subprocess.run(command(out, "trainer.strategy=ddp_spawn"), cwd=tmp_path, env=environment(quickstart_cache),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert by_id(out) == reference and leftover_parts(out) == []
    assert "12 prompts generated" in result.stdout and "processes: 2" in result.stdout


def test_kill_9_mid_way_then_rerun(quickstart_cache, reference, tmp_path):
    out = tmp_path / "killed.jsonl"
    cmd, env = command(out), environment(quickstart_cache)
    # Its own session, so that the kill reaches every process of the run (the launcher's child too).
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def lines_in(path: Path) -> int:
        return path.read_bytes().count(b"\n") if path.exists() else 0

    def lines_written() -> int:
        return sum(lines_in(p) for p in [out, *leftover_parts(out)])

    # Until both ranks have written a block: rank 0 into the output, rank 1 into its part file.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not (lines_in(out) and lines_in(part_path(out, 1))):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    written = lines_written()
    assert 1 <= written < len(reference), f"the run should have been killed mid-way ({written} lines)"
    part = part_path(out, 1)
    assert lines_in(part) >= 1, "rank 1 should have written a block"
    part.write_bytes(part.read_bytes() + b'{"id": "torn", "input_ids": [2, 3')  # as if cut mid-line

    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert by_id(out) == reference
    assert leftover_parts(out) == []
    metrics = json.loads(Path(f"{out}.metrics.json").read_text())
    assert metrics["prompts"]["prompts_skipped"] + metrics["prompts"]["prompts_generated"] == len(reference)


# --------------------------------------------------------------------------- the pieces


def test_shares_cover_every_block_once_and_have_one_length():
    prompts = [Prompt(i, tuple(range(1 + i % 4)), "") for i in range(11)]
    dm = PromptDataModule(prompts, 2, done_ids={0, 5})
    for world_size in (1, 2, 3, 4, 16):
        shares = [dm.shard(rank, world_size) for rank in range(world_size)]
        assert len({len(share) for share in shares}) == 1 and len(shares[0]) >= 1
        blocks = [b["block"] for share in shares for b in share if b["ids"]]
        assert sorted(blocks) == [b["block"] for b in dm.batches]  # each block once
        ids = [i for share in shares for b in share for i in b["ids"]]
        assert sorted(ids) == sorted(set(range(11)) - {0, 5})
    empty = PromptDataModule(prompts, 2, done_ids=range(11))
    assert [b["ids"] for b in empty.shard(0, 2)] == [[]] == [b["ids"] for b in empty.shard(1, 2)]


def test_leftover_part_files_count_as_done_and_are_merged(tmp_path):
    """A killed multi-process run's part files, rerun with one process: nothing generated twice."""
    rows = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out.jsonl"
    job = plan_run(config(tmp_path)).job.fingerprint
    line = lambda row: json.dumps({"id": row["id"], "input_ids": row["input_ids"],  # noqa: E731
                                   "output_ids": expected_output(row["input_ids"], 3), "job": job}) + "\n"
    out.write_text(line(rows[0]))
    part_path(out, 1).write_text(line(rows[1]) + line(rows[2]) + '{"id": "p3", "inp')  # torn tail
    part_path(out, 3).write_text(line(rows[0]) + line(rows[4]))  # p0 is already in the output
    factory = Factory()
    summary = run_predict(config(tmp_path), engine_factory=factory)
    assert leftover_parts(out) == []
    lines = read_out(out)
    assert sorted(x["id"] for x in lines) == sorted(r["id"] for r in rows)  # each once
    generated = {tuple(p) for call in factory.engine.calls for p in call["input_ids"]}
    assert generated == {tuple(r["input_ids"]) for r in (rows[3], rows[5], rows[6])}
    assert summary["prompts_skipped"] == 4 and summary["prompts_generated"] == 3


def test_part_file_of_a_live_writer_is_refused(tmp_path):
    import fcntl

    write_prompts(tmp_path / "prompts.jsonl")
    part = part_path(tmp_path / "out.jsonl", 1)
    part.write_text("")
    with open(part, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # a rank still writing it
        with pytest.raises(Exception, match="another flexgen predict is writing .*out.jsonl.rank1"):
            run_predict(config(tmp_path), engine_factory=Factory(forbid=True))


def test_policy_auto_is_chosen_by_rank_0_only(tmp_path, monkeypatch):
    """A rank > 0 neither plans nor measures: rank 0's choice reaches it by broadcast."""
    import types

    from lightning.pytorch.utilities import rank_zero_only

    from flexgen.models.opt import spec_for_size
    from flexgen.policy import Policy
    from flexgen.predict.resolve import resolve_policy

    def refuse(*args, **kwargs):
        raise AssertionError("rank 1 should not run the optimizer")

    monkeypatch.setitem(sys.modules, "flexgen.planner.optimizer", types.SimpleNamespace(auto_policy_for_run=refuse))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    write_prompts(tmp_path / "prompts.jsonl")
    policy, plugins, info = resolve_policy(config(tmp_path, "policy=auto"), spec_for_size("opt-125m"),
                                           [Prompt(0, (5, 6), "")])
    assert policy == Policy() and info == {"source": "auto"}


def test_aggregate_stats_sums_tokens_and_takes_the_longest_time():
    a = {"prefill_time_s": 1.0, "decode_time_s": 3.0, "prompt_tokens": 10, "generated_tokens": 40,
         "bytes_moved": {"cpu->gpu": 5}, "peak_memory": {"gpu": 7, "cpu": 1}, "compression": {"cache_raw_bytes": 4}}
    b = {"prefill_time_s": 2.0, "decode_time_s": 1.0, "prompt_tokens": 30, "generated_tokens": 20,
         "bytes_moved": {"cpu->gpu": 6}, "peak_memory": {"gpu": 3, "cpu": 9}, "compression": {"cache_raw_bytes": 2}}
    total = aggregate_stats([a, b])
    assert (total["prompt_tokens"], total["generated_tokens"]) == (40, 60)
    assert (total["prefill_time_s"], total["decode_time_s"]) == (2.0, 3.0)
    assert total["total_throughput"] == 60 / 4.0 and total["prefill_throughput"] == 40 / 2.0
    assert total["bytes_moved"] == {"cpu->gpu": 11} and total["peak_memory"] == {"gpu": 7, "cpu": 9}
    assert aggregate_stats([a]) == a


def test_gpu_memory_cap_sets_the_process_fraction(monkeypatch):
    import types

    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=80 << 30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, str(d))))
    assert cap_gpu_memory("cuda:1", "20GiB") == 0.25 and calls == [(0.25, "cuda:1")]
    assert cap_gpu_memory("cuda:0", "100GiB") is None  # not a cap: more than the GPU has
    assert cap_gpu_memory("cpu", "1GiB") is None and cap_gpu_memory("cuda:0", None) is None
    assert len(calls) == 1


@pytest.mark.gpu
def test_gpu_memory_cap_really_limits_the_allocator():
    """On a real GPU: past hardware.gpu_memory, allocations fail as on a smaller GPU."""
    import torch

    try:
        assert cap_gpu_memory("cuda:0", "256MiB") is not None
        small = torch.empty(64 << 20, dtype=torch.uint8, device="cuda:0")  # 64 MiB: fits
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(512 << 20, dtype=torch.uint8, device="cuda:0")
        del small
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
