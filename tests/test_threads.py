"""The engine's thread rule (flexgen/threads.py), checked on fake cores, cgroups and loads; no timings."""

from __future__ import annotations

import pytest
import torch

from flexgen import threads as T
from flexgen.config import load_config
from flexgen.errors import ConfigError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------- cores


def test_cgroup_v2_quota_is_the_smallest_on_the_way_up(tmp_path):
    root = tmp_path / "cg"
    write(tmp_path / "self", "0::/jobs/run1\n")
    write(root / "jobs" / "run1" / "cpu.max", "max 100000\n")  # no limit here ...
    write(root / "jobs" / "cpu.max", "250000 100000\n")  # ... 2.5 cores above it
    write(root / "cpu.max", "800000 100000\n")
    assert T.cgroup_quota_cores(root, tmp_path / "self") == 2.5


def test_cgroup_v1_quota(tmp_path):
    root = tmp_path / "cg"
    write(tmp_path / "self", "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "150000\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert T.cgroup_quota_cores(root, tmp_path / "self") == 1.5


def test_no_quota(tmp_path):
    root = tmp_path / "cg"
    write(tmp_path / "self", "1:cpu:/\n0::/\n")
    write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    write(root / "cpu.max", "max 100000\n")
    assert T.cgroup_quota_cores(root, tmp_path / "self") is None
    assert T.cgroup_quota_cores(root, tmp_path / "missing") is None


@pytest.mark.parametrize("affinity, quota, expected", [
    (8, None, 8),    # all the cores of the mask
    (8, 2.5, 3),     # a quota of 2.5 cores: 3 threads can use it (rounded up)
    (2, 16.0, 2),    # a quota above the mask does not add cores
    (4, 0.5, 1),     # at least one
])
def test_usable_cores(affinity, quota, expected):
    assert T.usable_cores(affinity=affinity, quota=quota) == expected


# --------------------------------------------------------------------------- load


def test_cpu_load_counts_other_processes_only(tmp_path, monkeypatch):
    """Busy ticks of our CPUs (steal included, idle and iowait not) minus this process's own time."""
    stat = tmp_path / "stat"
    write(stat, "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 900 0 0 0 0\ncpu1 100 0 0 900 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\n")
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(T.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(T, "_cpu_ids", lambda: {0, 1})
    own = iter([(1.0, 0.0), (2.0, 0.5)])  # this process: 1.5 s of CPU in the 2 s
    monkeypatch.setattr(T.os, "times", lambda: type("t", (), dict(zip(("user", "system"), next(own))))())
    load = T.CpuLoad(stat)
    # 2 s later: cpu0 +150 ticks user, +10 steal; cpu1 +40 system, +100 iowait; cpu2 (not ours) +200
    write(stat, "cpu  0 0 0 0 0 0 0 0\ncpu0 250 0 0 940 0 0 0 10\ncpu1 100 0 40 900 100 0 0 0\ncpu2 200 0 0 0 0 0 0 0\n")
    load._ticks = 100
    # busy 2.0 CPU-seconds of which 1.5 are ours: others 0.5 s over 2 s
    assert load.others() == pytest.approx(0.25)


def test_cpu_load_without_proc_stat(tmp_path):
    assert T.CpuLoad(tmp_path / "missing").others() is None


# --------------------------------------------------------------------------- decision


@pytest.mark.parametrize("usable, others, work, expected", [
    (2, 0.0, 1e9, 2),     # idle machine, big work: every core
    (2, 0.2, 1e9, 2),     # a little background noise leaves a core free
    (2, 1.0, 1e9, 1),     # a CPU-heavy process beside us: one thread
    (2, 0.67, 1e9, 1),    # ... as it looks while we run two threads beside it (a fair share of 2 cores)
    (8, 3.0, 1e9, 5),
    (4, 7.0, 1e9, 1),     # overloaded: still one
    (8, 0.0, 65_536, 1),  # the quickstart's products (hidden 64): not worth a second thread
    (8, 0.0, 5e6, 2),
    (8, None, 1e9, 8),    # load unknown (not Linux)
])
def test_auto_rule(usable, others, work, expected):
    choice = T.decide(None, usable, others, work)
    assert choice.threads == expected and choice.source == "auto"


def test_explicit_settings_win():
    assert T.decide(3, 2, 2.0, 1.0).threads == 3
    assert T.decide(3, 2, 2.0, 1.0).source == "hardware.threads"
    env = T.decide(None, 8, 0.0, 1e9, environment="1")
    assert (env.threads, env.source) == (1, "OMP_NUM_THREADS")
    assert T.decide(None, 8, 0.0, 1e9, environment="junk").source == "auto"


def test_describe_says_why():
    line = T.decide(None, 2, 1.0, 1e9).describe()
    assert line == "threads: 1 of 2 usable cores (auto: other processes busy on 1.0)"
    assert T.decide(None, 4, 0.0, 65_536).describe() == \
        "threads: 1 of 4 usable cores (auto: other processes busy on 0.0, work too small for more than 1)"
    assert T.decide(2, 4, None, None).describe() == "threads: 2 of 4 usable cores (hardware.threads)"
    choice = T.decide(None, 2, 0.3, 1e9)
    assert T.ThreadChoice.from_dict(choice.to_dict()) == choice


@pytest.mark.parametrize("value, expected", [("auto", None), (None, None), (3, 3), ("2", 2)])
def test_parse_threads(value, expected):
    assert T.parse_threads(value) == expected


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, True])
def test_bad_threads_setting_is_one_line(value):
    with pytest.raises(ConfigError) as err:
        T.parse_threads(value)
    assert str(err.value) == f"hardware.threads must be 'auto' or a number of threads >= 1, got {value!r}"


def test_config_key(tmp_path):
    assert load_config(None, ["model.synthetic=opt-125m", "data.num_prompts=1", "data.prompt_len=2"]).threads() is None
    cfg = load_config(None, ["model.synthetic=opt-125m", "data.num_prompts=1", "data.prompt_len=2",
                             "hardware.threads=2"])
    assert cfg.threads() == 2
    with pytest.raises(ConfigError, match=r"^hardware.threads must be 'auto' or a number of threads >= 1, got 0$"):
        load_config(None, ["model.synthetic=opt-125m", "data.num_prompts=1", "data.prompt_len=2", "hardware.threads=0"])


# --------------------------------------------------------------------------- applied


def test_governor_applies_and_gives_the_callers_setting_back(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    target = 2 if before != 2 else 3
    governor = T.ThreadGovernor(target, None)
    with governor.applied() as choice:
        assert choice.threads == target and torch.get_num_threads() == target
    assert torch.get_num_threads() == before


def test_governor_applies_its_setting_again_on_every_use(monkeypatch):
    """A fixed setting (and an auto one not yet due to be decided again) is applied at each
    ``generate``, not only the first: ``applied`` gives the caller's setting back in between."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    target = 2 if before != 2 else 3
    governor = T.ThreadGovernor(target, None)
    for _ in range(3):
        with governor.applied():
            assert torch.get_num_threads() == target
        assert torch.get_num_threads() == before


def test_engine_computes_every_generate_with_its_setting():
    from flexgen import Policy, load_engine

    before = torch.get_num_threads()
    target = 2 if before != 2 else 3
    seen = []
    with load_engine("opt-125m", policy=Policy(gpu_batch_size=1, pin_weights=False), device="cpu",
                     dtype="float32", threads=target) as engine:
        run_step = engine._run_step

        def step(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return run_step(*args, **kwargs)

        engine._run_step = step
        for _ in range(3):
            engine.generate([[2, 5, 6]], max_new_tokens=2)
            assert torch.get_num_threads() == before
    assert seen and set(seen) == {target}


def test_governor_samples_the_load_only_when_more_than_one_thread_could_help(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(T, "usable_cores", lambda: 4)
    assert T.ThreadGovernor(None, 1e3)._load is None  # one thread whatever the load
    assert T.ThreadGovernor(2, 1e9)._load is None  # fixed by the user
    governor = T.ThreadGovernor(None, 1e9)
    assert governor._load is not None
    monkeypatch.setattr(governor._load, "others", lambda: 3.0)
    monkeypatch.setattr(governor._load, "window", lambda: 1.0)
    before = torch.get_num_threads()
    try:
        assert governor.update().threads == 1
        monkeypatch.setattr(governor._load, "others", lambda: 0.0)
        assert governor.update().threads == 4  # the load went away: decided again
    finally:
        torch.set_num_threads(before)


def test_single_threaded_ops_restores():
    before = torch.get_num_threads()
    with T.single_threaded_ops():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_engine_reports_what_it_used():
    """The engine's stats carry the setting the summary and the bench print."""
    from flexgen import Policy, load_engine

    with load_engine("opt-125m", policy=Policy(gpu_batch_size=1, pin_weights=False), device="cpu",
                     dtype="float32", threads=1) as engine:
        engine.generate([[2, 5, 6]], max_new_tokens=1)
        assert engine.stats.to_dict()["threads"] == {"threads": 1, "source": "hardware.threads", "usable_cores":
                                                      T.usable_cores(), "others_busy_cores": None, "work_cap": None}
