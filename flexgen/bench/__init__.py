"""``flexgen bench``'s measurement: generation throughput beside the cost model's bound, and pictures of it.

* :mod:`~flexgen.bench.measure` runs a workload (synthetic weights and prompts, read from a
  config as ``flexgen predict`` reads it), optionally HF transformers beside it, and reports
  measured rates next to the bound for the same policy on this machine;
* :mod:`~flexgen.bench.plot` draws one report or several side by side (matplotlib, optional).

The command (its options, ``--json``, ``--plot``) is :mod:`flexgen.cli.bench`.
"""

from flexgen.bench.measure import BenchReport, Rates, format_report, run_bench

__all__ = ["BenchReport", "Rates", "format_report", "run_bench"]
