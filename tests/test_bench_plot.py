"""``flexgen bench --plot``: a bench result drawn (measured beside bound, bytes per link), or
several earlier ``--json`` results side by side."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from flexgen.cli import main as cli_main

pytest.importorskip("matplotlib", reason="the plot extra is not installed (pip install 'flexgen[plot]')")
from matplotlib.image import imread  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU_BENCH = REPO / "configs" / "bench" / "cpu-opt-125m.yaml"


def bound_only(tmp_path: Path, name: str, *overrides: str) -> Path:
    """A real bench JSON (the bound is computed, nothing is run: seconds)."""
    out = tmp_path / f"{name}.json"
    assert cli_main(["bench", "--config", str(CPU_BENCH), "--bound-only", "--hardware", "t4-paper",
                     "--json", str(out), *overrides]) == 0
    return out


def measured(report: Path) -> Path:
    """The same result as if it had been measured: half the bound, and the model's bytes moved."""
    data = json.loads(report.read_text())
    data["measured"] = {k: v / 2 for k, v in data["bound"].items()}
    data["engine_stats"] = {"bytes_moved": {k: 0.9 * v for k, v in data["bound_bytes"].items()}}
    report.write_text(json.dumps(data))
    return report


def test_one_result_and_several_side_by_side(tmp_path, capsys):
    one = tmp_path / "one.png"
    gpu = bound_only(tmp_path, "gpu", "--plot", str(one))
    assert imread(one).shape[2] in (3, 4), "a PNG image"
    disk = measured(bound_only(tmp_path, "disk", "policy.weights_gpu=40", "policy.weights_cpu=0"))
    both = tmp_path / "both.png"
    capsys.readouterr()
    assert cli_main(["bench", "--plot", str(both), str(measured(gpu)), str(disk)]) == 0
    assert "drew 2 result(s)" in capsys.readouterr().out
    height, width = imread(one).shape[:2], imread(both).shape[1]
    assert width > 1.8 * height[1] and imread(both).shape[0] == height[0], "two columns, side by side"


@pytest.mark.parametrize("content, expected", [
    ("not json", "cannot read .*bad.json as JSON"),
    ('{"model": "x"}', "bad.json is not a flexgen bench --json file"),
])
def test_plot_mistakes_are_one_line(tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert cli_main(["bench", "--plot", str(tmp_path / "x.png"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flexgen bench: error: --plot: ")
    assert re.search(expected, err)
    assert not (tmp_path / "x.png").exists()


def test_plot_arguments_checked_before_anything_runs(tmp_path, capsys, monkeypatch):
    assert cli_main(["bench", "--plot", str(tmp_path / "x.gif"), "a.json"]) == 2
    assert "must end in .png, .svg or .pdf" in capsys.readouterr().err
    assert cli_main(["bench", "--plot", str(tmp_path / "no" / "x.png"), "a.json"]) == 2
    assert "folder" in capsys.readouterr().err
    assert cli_main(["bench", "--plot", str(tmp_path / "x.png")]) == 2
    assert "draws bench JSON files" in capsys.readouterr().err
    assert cli_main(["bench"]) == 2
    assert "--config is required" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    report = bound_only(tmp_path, "r")
    assert cli_main(["bench", "--plot", str(tmp_path / "x.png"), str(report)]) == 2
    assert "needs matplotlib: pip install 'flexgen[plot]'" in capsys.readouterr().err
    # before a bench runs, not after it: no result is written
    assert cli_main(["bench", "--config", str(CPU_BENCH), "--json", str(tmp_path / "run.json"),
                     "--plot", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == "flexgen bench: error: --plot needs matplotlib: pip install 'flexgen[plot]'"
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "x.png").exists()


def test_bound_only_bytes_are_not_drawn_as_measured_zeros(tmp_path):
    """A --bound-only result has no measured bytes: its panel shows the cost model's alone, not 0 GB bars."""
    from matplotlib.figure import Figure

    from flexgen.bench.plot import _bytes

    bound = json.loads(bound_only(tmp_path, "disk", "policy.weights_gpu=40", "policy.weights_cpu=0").read_text())
    ran = json.loads(measured(bound_only(tmp_path, "ran", "policy.weights_gpu=40", "policy.weights_cpu=0")).read_text())
    labels = {}
    for name, report in (("bound", bound), ("ran", ran)):
        ax = Figure().subplots()
        _bytes(ax, report)
        labels[name] = (ax.get_legend_handles_labels()[1], ax.get_title())
    assert labels["bound"] == (["cost model"], "bytes moved per link (cost model only: not measured)")
    assert labels["ran"] == (["measured", "cost model"], "bytes moved per link")
