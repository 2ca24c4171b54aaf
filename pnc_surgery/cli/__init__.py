"""The ``pnc-surgery`` command: find points, clone, run the demo, share and inspect patches.

Each command group lives in its own module and registers itself on the parser; this module wires them and sends
every error through :func:`.errors.report` (one line on stderr, one exit code per kind of error).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from .clone import register as register_clone
from .errors import EXIT_CODES, USAGE, CommandError, report
from .hub import register as register_hub
from .points import register as register_points

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors go through the same one-line report as every other error."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see {self.prog} --help)", USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    from .. import __version__

    codes = "\n".join(
        textwrap.fill(meaning, 100, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
        for code, meaning in EXIT_CODES.items()
    )
    parser = _Parser(
        prog="pnc-surgery",
        description="Partial Network Cloning: copy classes of a source classifier into a target as a detachable patch.",
        epilog=f"exit codes (the same in every command; errors are one line on stderr):\n{codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pnc_surgery {__version__}")
    parser.add_argument("--traceback", action="store_true", help="print the full traceback of an error too")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_points(subparsers)
    register_clone(subparsers)
    register_hub(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except CommandError as exc:
        command = next((a for a in argv if not a.startswith("-")), "")
        return report(command or "", exc)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # every error ends here: one line and its exit code
        return report(args.command, exc, show_traceback=args.traceback)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
