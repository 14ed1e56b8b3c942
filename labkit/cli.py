"""The ``labkit`` command line: parses arguments and prints; the work is elsewhere.

Each area of labkit registers its own sub-commands through a ``register(subparsers)``
function in the module listed in :data:`COMMAND_MODULES`; a sub-command sets
``func`` (taking the parsed arguments, returning an exit code).  This is the only
place, with those ``register`` modules, that prints for a user.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from labkit import __version__
from labkit.exceptions import LabkitError
from labkit.signals import orderly_signals

# Modules that add sub-commands, in the order their commands are listed.
COMMAND_MODULES = (
    "labkit.doctor",
    "labkit.testbed.testbed_cli",
    "labkit.loadgen.loadgen_cli",
    "labkit.monitor.monitor_cli",
    "labkit.replay.replay_cli",
    "labkit.jupyter",
    "labkit.capacity_cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="labkit",
        description="Replay Linux conntrack throttling a TFTP NodePort service, step by step.",
    )
    parser.add_argument("--version", action="version", version=f"labkit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more diagnostics on stderr (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not exc.name or not (name == exc.name or name.startswith(exc.name + ".")):
                raise  # a module that exists failed to import: a real bug
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with orderly_signals() as caught:  # SIGTERM/SIGHUP: the same orderly teardown as Ctrl-C
        try:
            return int(args.func(args) or 0)
        except LabkitError as exc:
            print(f"labkit {args.command}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"labkit {args.command}: interrupted ({caught.name})",
                  file=sys.stderr)
            return caught.exit_code
