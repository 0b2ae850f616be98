"""scripts/device-check: its time limits, its test selection and its table (the rehearsal itself
runs in CI, from .ci/run: ``scripts/device-check --rehearse``)."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device_check():
    loader = importlib.machinery.SourceFileLoader("device_check", str(REPO / "scripts" / "device-check"))
    spec = importlib.util.spec_from_loader("device_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_time_limits_add_up_to_at_most_eight_minutes(device_check):
    assert sum(device_check.LIMITS.values()) <= 8 * 60
    assert set(device_check.LIMITS) == {"install", "hardware", "tests", *(w[0] for w in device_check.WORKLOADS)}
    assert [w[0] for w in device_check.WORKLOADS][0] == "W1"  # the cheapest first


def test_every_selected_test_exists(device_check):
    """A renamed test would silently drop out of the lent GPU's one run: every path and name exists."""
    for selection in device_check.GPU_TESTS:
        path, _, name = selection.partition("::")
        assert (REPO / path).exists(), selection
        if name:
            functions = {node.name for node in ast.walk(ast.parse((REPO / path).read_text()))
                         if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
            assert name in functions, selection


def test_every_workload_config_exists(device_check):
    for _, config, _ in device_check.WORKLOADS:
        assert (REPO / "configs" / "bench" / config).is_file(), config


def test_table_shows_measured_partial_and_missing_workloads(device_check, tmp_path):
    """A workload stopped by its time limit still shows the bound its bench wrote first."""
    full = {
        "model": "opt-6.7b (synthetic, seed 0)", "measured": {"prefill": 30000.0, "decode": 2100.0, "total": 1900.5},
        "bound": {"prefill": 40000.0, "decode": 2500.0, "total": 2278.0}, "reached_percent": {"total": 83.4},
        "bound_bottleneck": {"decode": "gpu_memory"}, "load_time_s": 3.2,
        "engine_stats": {"bytes_moved": {"cpu->gpu": 4.8e11}}, "bound_bytes": {"cpu->gpu": 4.8e11, "disk->cpu": 0.0},
    }
    partial = {"model": "opt-30b", "measured": None, "bound": {"total": 104.6}, "reached_percent": {"total": None},
               "bound_bottleneck": {"decode": "cpu->gpu"}, "bound_bytes": {"cpu->gpu": 6e11}}
    (tmp_path / "W1.json").write_text(json.dumps(full))
    (tmp_path / "W2.json").write_text(json.dumps(partial))
    steps = {"W1": {"status": "ok"}, "W2": {"status": "timeout (60 s)"}, "W5": {"status": "failed (exit 1)"}}
    rows = device_check.table_rows(tmp_path, steps)
    assert [r["workload"] for r in rows] == ["W1", "W2", "W5"]
    lines = device_check.format_table(rows).splitlines()
    assert lines[1].startswith("W1") and "1,900.5" in lines[1] and "83.4 %" in lines[1]
    assert "cpu->gpu 480.0 | 480.0" in lines[1] and "disk->cpu" not in lines[1]
    assert lines[2].startswith("W2") and "timeout" in lines[2] and "104.6" in lines[2]
    assert lines[3].startswith("W5") and "failed" in lines[3]


def test_unknown_only_step_is_one_line_and_exit_2(device_check, capsys):
    assert device_check.main(["--only", "W9"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "W9" in out[0]


def test_a_step_past_its_limit_is_interrupted_first_then_killed(device_check, tmp_path, monkeypatch):
    """A step still running shortly before its limit gets SIGINT, so pytest can print its failures
    (and a bench its partial figures); one that ignores it is killed at the limit."""
    import shutil
    import sys

    monkeypatch.setitem(device_check.LIMITS, "W1", 2)
    monkeypatch.setitem(device_check.LIMITS, "W2", 2)
    monkeypatch.setattr(device_check, "INTERRUPT_GRACE_S", 1)
    run = device_check.Run(tmp_path, rehearse=True)
    polite = ("import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n"
              "    print('summary printed on interrupt', flush=True)\n    raise SystemExit(2)")
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)"
    assert run.step("W1", [sys.executable, "-c", polite])["status"] == "timeout (2 s)"
    result = run.step("W2", [sys.executable, "-c", stubborn])
    assert result["status"] == "timeout (2 s)" and result["seconds"] < 10
    run.log.close()
    shutil.rmtree(run.work, ignore_errors=True)
    assert "summary printed on interrupt" in (tmp_path / "device-check.log").read_text()
