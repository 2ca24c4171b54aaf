"""The ``pnc-surgery`` command: find points, clone, run the demo, share and inspect patches.

Each command group lives in its own module and registers itself on the parser; this module only wires them
and turns the library's errors into one-line messages and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..errors import PncError
from .clone import register as register_clone
from .hub import register as register_hub
from .points import register as register_points

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="pnc-surgery",
        description="Partial Network Cloning: copy classes of a source classifier into a target as a detachable patch.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"pnc_surgery {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_points(subparsers)
    register_clone(subparsers)
    register_hub(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PncError as exc:
        print(f"pnc-surgery {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"pnc-surgery {args.command}: error: invalid JSON argument ({exc})", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
