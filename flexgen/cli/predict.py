"""``flexgen predict --config FILE [key=value ...]``: parse, then run (or plan, or print) a predict job.

The run itself is :func:`flexgen.predict.run.run_predict`; this module is the command around
it: its options, the logging a terminal wants, and SIGTERM turned into a clean stop
(finished blocks kept, one line, exit status 143) as Ctrl-C is (130).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

from flexgen.cli.args import ArgParser
from flexgen.config import load_config, to_yaml
from flexgen.errors import Terminated
from flexgen.predict.resolve import resolved_policy
from flexgen.predict.run import run_predict
from flexgen.predict.summary import format_summary


def predict_command(argv: list[str]) -> int:
    """Entry point of ``flexgen predict``; returns the exit status."""
    parser = ArgParser(
        prog="flexgen predict",
        description="Generate for every prompt of a config. Rerun the same command to resume.",
        epilog="example: flexgen predict --config configs/quickstart.yaml generation.max_new_tokens=16",
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and README.md)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit (policy: auto is resolved by the cost model)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (as flexgen plan does) and exit, without generating or writing anything")
    parser.add_argument("--restart", action="store_true",
                        help="discard the lines already in output.path (flexgen output only) and generate every prompt "
                        "again, e.g. after changing the model or generation settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. policy.gpu_batch_size=8")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg, resolved_policy(cfg) if cfg.policy.auto else None), end="")
        return 0
    if args.dry_run:
        from flexgen.cli.plan import print_plan

        return print_plan(cfg)
    with _cli_logging(), _sigterm_stops_the_run():
        summary = run_predict(cfg, restart=args.restart)
    if summary.get("rank", 0) == 0:  # with several processes, one summary is enough
        print(format_summary(summary))
    return 0


@contextlib.contextmanager
def _sigterm_stops_the_run():
    """While the command runs, SIGTERM raises :class:`~flexgen.errors.Terminated` (a KeyboardInterrupt).

    Schedulers stop jobs with SIGTERM; its default action kills the process on the spot, so the
    run could not say what it kept, close its engine or release its scratch files. Raised as a
    KeyboardInterrupt, it takes the path Ctrl-C takes: Lightning calls the callbacks'
    ``on_exception`` and tears the strategy down (and, under ``ddp``, stops the processes it
    started); the CLI prints one line and exits 143 (130 for Ctrl-C). A second SIGTERM while
    stopping is ignored. Only the main thread can install a handler; elsewhere (a test calling
    in from a thread) SIGTERM keeps its default.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _cli_logging():
    """Print flexgen's INFO messages as ``flexgen: ...`` on stderr while the command runs.

    Everything is put back afterwards, so calling the command in-process (tests) leaves the
    ``flexgen`` logger as it found it (propagation included, which pytest's caplog relies on).
    """
    logger = logging.getLogger("flexgen")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("flexgen: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved
