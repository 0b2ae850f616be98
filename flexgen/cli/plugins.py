"""``flexgen plugins``: every registered plugin per kind, with the distribution that provides it."""

from __future__ import annotations

import argparse


def plugins_command(argv: list[str]) -> int:
    """Print every registered plugin; a plugin that fails to import gets a one-line warning."""
    from flexgen import registry

    parser = argparse.ArgumentParser(prog="flexgen plugins", description="List registered plugins per kind, with their distributions.")
    parser.add_argument("--no-check", action="store_true", help="list without importing the plugins")
    args = parser.parse_args(argv)
    rows = [(info, None) for info in registry.list_plugins()] if args.no_check else registry.check_all()
    for kind, group in registry.GROUPS.items():
        print(f"{kind} ({group}):")
        for info, error in rows:
            if info.kind == kind:
                status = f"  [broken: {error}]" if error else ""
                print(f"  {info.name:<12} {info.distribution:<28} {info.target}{status}")
    return 0
