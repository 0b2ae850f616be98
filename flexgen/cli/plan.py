"""``flexgen plan --config FILE [key=value ...] [--json]``: the plan of a predict run, before it runs.

What the plan holds and how it is found: :mod:`flexgen.predict.plan`.
"""

from __future__ import annotations

import json

from flexgen.cli.args import ArgParser
from flexgen.config import FlexGenConfig, load_config
from flexgen.predict.plan import format_plan, make_plan


def plan_command(argv: list[str]) -> int:
    """Entry point of ``flexgen plan``; returns the exit status."""

    parser = ArgParser(
        prog="flexgen plan",
        description="Show what flexgen predict would do with a config, without running it: the resolved policy "
        "(policy: auto too), where each layer's weights, each GPU batch's cache and activations live, the predicted "
        "memory per tier and the predicted throughput.",
        epilog="example: flexgen plan --config configs/quickstart.yaml policy=auto",
    )
    parser.add_argument("--config", required=True, help="YAML config, as for flexgen predict")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (for scripts)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. policy.gpu_batch_size=8")
    args = parser.parse_args(argv)
    return print_plan(load_config(args.config, args.overrides), args.json)


def print_plan(cfg: FlexGenConfig, as_json: bool = False) -> int:
    """Print the plan of ``cfg`` (``flexgen plan``, ``flexgen predict --dry-run``)."""
    view = make_plan(cfg)
    print(json.dumps(view.to_dict(), indent=1, default=str) if as_json else format_plan(view))
    return 0
