"""``pnc-surgery points MODEL``: the cut / insertion points of a model, as a table."""

from __future__ import annotations

import argparse
import json

from ..models import load_model
from ..points import Point, find_points
from .clone import json_object

__all__ = ["register", "format_points"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``points`` subcommand."""
    parser = subparsers.add_parser("points", help="list where a model can be cut or tapped", description=__doc__)
    parser.add_argument("model", help="timm name (resnet18), Hub id (timm/resnet18.a1_in1k) or local model folder")
    parser.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load pretrained weights (default: yes for Hub ids and folders, no for timm names)",
    )
    parser.add_argument("--kwargs", help='create_model kwargs (timm) or config fields, as JSON: {"img_size": 64}')
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--explain", action="store_true", help="also print every candidate module and why it is not a point"
    )
    parser.set_defaults(func=_run)


def format_points(points: list[Point]) -> str:
    """A fixed-width table of points."""
    rows = [("#", "name", "shape", "layout", "reduction", "width")]
    rows += [
        (str(p.index), p.name, "x".join(map(str, p.shape)), p.layout, str(p.reduction or "-"), str(p.width))
        for p in points
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _run(args: argparse.Namespace) -> int:
    model = load_model(args.model, pretrained=args.pretrained, **json_object(args.kwargs, "--kwargs"))
    points = find_points(model, explain=args.explain and not args.json)
    print(json.dumps([p.to_dict() for p in points], indent=2) if args.json else format_points(points))
    return 0
