"""``flexgen predict | plan | bench | plugins | policy``: the command-line front ends, one module each.

Each subcommand lives in its own module of this folder and is imported only when used, so ``flexgen plugins``
stays fast and a broken optional piece cannot break the others. Every user mistake surfaces as
a :class:`~flexgen.errors.FlexGenError`: one line on stderr, exit status 2, no traceback. An
interrupted command says so in one line too: exit status 130 for Ctrl-C (SIGINT), 143 for
SIGTERM.
"""

from __future__ import annotations

import importlib
import os
import sys

from flexgen.errors import FlexGenError, Terminated

#: subcommand -> (module:function taking argv and returning an exit code, help line)
COMMANDS = {
    "predict": ("flexgen.cli.predict:predict_command", "generate for every prompt of a config; resumable"),
    "plan": ("flexgen.cli.plan:plan_command", "show what predict would do with a config, without running it"),
    "bench": ("flexgen.cli.bench:bench_command", "measure throughput on synthetic weights beside its roofline"),
    "plugins": ("flexgen.cli.plugins:plugins_command", "list registered plugins per kind, with their distributions"),
    "policy": ("flexgen.cli.policy:policy_command", "choose a policy for a model and workload with the cost model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-V"):
        from flexgen import __version__

        print(f"flexgen {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: flexgen [--version] {" + ",".join(COMMANDS) + "} ...\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"flexgen: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    target, _ = COMMANDS[argv[0]]
    module_name, function_name = target.split(":")
    try:
        if argv[0] in ("predict", "bench"):
            check_environment()
            from flexgen import registry

            registry.warn_broken()  # one line per broken third-party plugin; the run goes on
        command = getattr(importlib.import_module(module_name), function_name)
        return int(command(argv[1:]) or 0)
    except FlexGenError as exc:
        print(f"flexgen {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        if _first_process():
            print(f"flexgen {argv[0]}: terminated (SIGTERM); finished outputs are kept, rerun to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if _first_process():
            print(f"flexgen {argv[0]}: interrupted; finished outputs are kept, rerun to resume", file=sys.stderr)
        return 130


def check_environment() -> None:
    """The ``FLEXGEN_*`` switches the engine reads where it builds its kernels, checked before
    anything else is imported or loaded: a mistyped one then costs seconds, not a model load."""
    from flexgen.kernels.build import native_kernels_allowed
    from flexgen.linear import setting

    native_kernels_allowed()
    setting()


def _first_process() -> bool:
    """Whether this is the process a user started, not one Lightning's launcher started beside it.

    Ctrl-C and a SIGTERM sent to a whole process group reach every process of a multi-process
    run; one line says what happened, printed by the first.
    """
    return os.environ.get("LOCAL_RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
