"""``pnc-surgery points MODEL``: the cut / insertion points of a model, as a table."""

from __future__ import annotations

import argparse
import json

from ..points import find_points
from .models import load_model

__all__ = ["register", "format_points"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("points", help="list where a model can be cut or tapped", description=__doc__)
    parser.add_argument("model", help="a timm model name (e.g. resnet18) or a local transformers model folder")
    parser.add_argument("--pretrained", action="store_true", help="load pretrained timm weights (needs network)")
    parser.add_argument("--kwargs", help="timm create_model kwargs as JSON, e.g. '{\"img_size\": 64}'")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_run)


def format_points(points: list) -> str:
    """A fixed-width table of points."""
    rows = [("#", "name", "shape", "layout", "reduction", "width")]
    rows += [
        (str(p.index), p.name, "x".join(map(str, p.shape)), p.layout, str(p.reduction or "-"), str(p.width))
        for p in points
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _run(args: argparse.Namespace) -> int:
    model = load_model(args.model, pretrained=args.pretrained, kwargs=args.kwargs)
    points = find_points(model)
    print(json.dumps([p.to_dict() for p in points], indent=2) if args.json else format_points(points))
    return 0
