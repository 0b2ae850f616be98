"""``flexgen bench --plot FILE.png``: a bench result as a picture, or several side by side.

Each result gets one column of two panels:

* **throughput**: prefill, decode and total tokens/s, measured beside the cost model's bound
  (the roofline), each measured bar labelled with the percentage of the bound it reached. The
  axis is logarithmic: a bound is often orders of magnitude above a small measurement, and a
  linear axis would flatten the measured bars to nothing.
* **bytes moved per link** (disk->cpu, cpu->gpu, gpu->cpu, cpu->disk): measured by the engine
  beside the cost model's count for the same policy; links on which neither moved anything are
  left out. A gap here says the engine moves what the model does not expect (or the reverse).

A bench that only computed its bound (``--bound-only``) shows the bound bars alone. Several
results (``flexgen bench --plot out.png a.json b.json``) share the throughput axis range so
their bars compare by eye. matplotlib is an optional extra (``pip install 'flexgen[plot]'``);
the figure is drawn with ``matplotlib.figure.Figure`` directly, so no pyplot state or GUI
backend is involved.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexgen.errors import ConfigError

PHASES = ("prefill", "decode", "total")
LINKS = ("disk->cpu", "cpu->gpu", "gpu->cpu", "cpu->disk")
MEASURED_COLOR, BOUND_COLOR = "#1f77b4", "#bbbbbb"


def read_report(path: Path) -> dict[str, Any]:
    """A ``flexgen bench --json`` file, checked to be one; ConfigError naming the file otherwise."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"--plot: {path} not found") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--plot: cannot read {path} as JSON ({exc})") from exc
    if not isinstance(report, dict) or not all(k in report for k in ("bound", "policy", "model")):
        raise ConfigError(f"--plot: {path} is not a flexgen bench --json file (it has no 'bound', 'policy' and 'model')")
    return report


def _figure_class() -> type:
    """matplotlib's ``Figure``, or a ConfigError saying how to install the optional extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'flexgen[plot]'") from exc
    return Figure


def check_plot_path(path: Path) -> None:
    """The picture's path: in an existing folder, with a suffix matplotlib writes (png, svg, pdf);
    and matplotlib importable. Checked before a bench runs, so a mistake costs no measurement."""
    _figure_class()
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot: {path} must end in .png, .svg or .pdf")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"--plot: folder {folder} does not exist")
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise ConfigError(f"--plot: {path} is not a regular file")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--plot: cannot write in {folder}")


def label(report: dict[str, Any], name: str | None = None) -> str:
    """A column's title: the file name (when given), the model, the device and the policy's shape."""
    p = report["policy"]
    tiers = lambda kind: f"{p[f'{kind}_gpu']:g}/{p[f'{kind}_cpu']:g}"  # noqa: E731
    head = f"{name}\n" if name else ""
    return (f"{head}{report['model']}, {report.get('dtype', '?')} on {report.get('device', '?')}\n"
            f"block {p['num_gpu_batches']}x{p['gpu_batch_size']}, weights gpu/cpu {tiers('weights')}, "
            f"cache {tiers('cache')}")


def plot_reports(reports: Sequence[dict[str, Any]], path: Path, names: Sequence[str | None] | None = None) -> Path:
    """Draw ``reports`` side by side into ``path`` (written whole: a temporary file renamed over it)."""
    Figure = _figure_class()
    names = list(names or [None] * len(reports))
    columns = len(reports)
    fig = Figure(figsize=(5.2 * columns, 8.4), layout="constrained")
    axes = fig.subplots(2, columns, squeeze=False)
    rates = [v for r in reports for kind in ("measured", "bound") for v in _rates(r, kind) if v]
    low, high = (min(rates) / 3, max(rates) * 12) if rates else (0.1, 10)  # headroom for the labels and legend
    for column, (report, name) in enumerate(zip(reports, names)):
        _throughput(axes[0][column], report, (low, high))
        axes[0][column].set_title(label(report, name), fontsize=9)
        _bytes(axes[1][column], report)
    fig.suptitle("flexgen bench: measured beside the cost model", fontsize=12)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's owner-only mode
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"--plot: cannot write {path} ({exc.strerror or exc})") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _rates(report: dict[str, Any], kind: str) -> list[float | None]:
    values = report.get(kind) or {}
    return [_finite(values.get(phase)) for phase in PHASES]


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def _rate(value: float) -> str:
    """Tokens/s as a label: whole numbers from 100 up, three significant digits below (6.31, not 6)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _throughput(ax, report: dict[str, Any], limits: tuple[float, float]) -> None:
    measured, bound = _rates(report, "measured"), _rates(report, "bound")
    x = range(len(PHASES))
    width = 0.38
    ax.bar([i - width / 2 for i in x], [v or 0 for v in measured], width, label="measured", color=MEASURED_COLOR)
    ax.bar([i + width / 2 for i in x], [v or 0 for v in bound], width, label="bound (roofline)", color=BOUND_COLOR)
    for i, (m, b) in enumerate(zip(measured, bound)):
        if m is not None:
            text = _rate(m) + (f"\n{100 * m / b:.0f} % of bound" if b else "")
            ax.annotate(text, (i - width / 2, m), ha="center", va="bottom", fontsize=7)
        if b is not None:
            ax.annotate(_rate(b), (i + width / 2, b), ha="center", va="bottom", fontsize=7, color="#555555")
    ax.set_yscale("log")
    ax.set_ylim(*limits)
    ax.set_xticks(list(x), list(PHASES))
    ax.set_ylabel("tokens/s (log scale)")
    if not any(measured):  # below the legend, which stays at the top
        ax.text(0.5, 0.88, "bound only (not measured)", transform=ax.transAxes, ha="center", va="top", fontsize=8)
    ax.legend(fontsize=8, loc="upper center", ncols=2)


def _bytes(ax, report: dict[str, Any]) -> None:
    modelled = report.get("bound_bytes") or {}
    ran = any(_rates(report, "measured"))  # a --bound-only result has no measured bytes to show as zero
    measured = ((report.get("engine_stats") or {}).get("bytes_moved") or {}) if ran else {}
    links = [link for link in LINKS if modelled.get(link) or measured.get(link)]
    ax.set_title("bytes moved per link" + ("" if ran else " (cost model only: not measured)"), fontsize=9)
    if not links:
        ax.text(0.5, 0.5, "no bytes cross a link with this policy\n(everything lives on the compute device)",
                transform=ax.transAxes, ha="center", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    x = range(len(links))
    width = 0.38
    bars = [("measured", measured, MEASURED_COLOR, -width / 2), ("cost model", modelled, BOUND_COLOR, width / 2)]
    if not ran:
        bars = [("cost model", modelled, BOUND_COLOR, 0.0)]
    for name, values, color, offset in bars:
        gb = [values.get(link, 0) / 1e9 for link in links]
        ax.bar([i + offset for i in x], gb, width, label=name, color=color)
        for i, value in zip(x, gb):
            ax.annotate(f"{value:.2f} GB", (i + offset, value), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), links)
    ax.set_xlim(-0.6, len(links) - 0.4)  # one link alone keeps the bars' width
    ax.set_ylabel("GB over the run")
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="upper center", ncols=2)
