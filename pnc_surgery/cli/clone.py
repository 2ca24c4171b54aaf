"""``pnc-surgery clone`` (clone classes from image folders) and ``pnc-surgery demo`` (the built-in story).

Every argument is checked before any model is built or trained: the output folder, the JSON options, the data
folders; then the models and their checkpoints are read, and ``clone`` reads every image (for each model through its
own preprocessing, as for a folder passed in Python) before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..clone import BUDGETS, CloneConfig, clone
from ..models import load_model
from .errors import UNUSABLE, CommandError

__all__ = ["register", "check_output_folder", "json_object"]

_MODEL_HELP = "timm name (resnet18), Hub id (timm/resnet18.a1_in1k, google/vit-base-patch16-224) or local folder"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``clone`` and ``demo`` subcommands."""
    parser = subparsers.add_parser("clone", help="clone classes of a source model into a target model")
    parser.description = __doc__
    parser.add_argument("--source", required=True, help=f"the source model: {_MODEL_HELP}")
    parser.add_argument("--target", required=True, help=f"the target model: {_MODEL_HELP}")
    parser.add_argument("--source-checkpoint", help="safetensors state dict to load into the source")
    parser.add_argument("--target-checkpoint", help="safetensors state dict to load into the target")
    parser.add_argument("--source-kwargs", help="create_model kwargs (timm) or config fields (transformers), as JSON")
    parser.add_argument("--target-kwargs", help="create_model kwargs (timm) or config fields (transformers), as JSON")
    parser.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load pretrained weights (default: yes for Hub ids and folders, no for timm names)",
    )
    for role in ("source", "target"):
        parser.add_argument(
            f"--{role}-processor",
            help=f"Hub id or folder of the {role}'s image processor, for a transformers {role} saved without one "
            "(default: the model's own; timm models: their data config)",
        )
    parser.add_argument("--data", required=True, help="image folder: one sub-folder per source class (id or name)")
    parser.add_argument("--replay", help="image folder of target-domain images (any sub-folders) that keep locality")
    parser.add_argument("--classes", nargs="+", type=int, help="source class ids to clone (default: all sub-folders)")
    parser.add_argument("--out", required=True, help="folder to save the patch to (must not exist, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the patch files in an existing --out folder")
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        help="CloneConfig(budget=...): how long the search and the training work (default: default)",
    )
    parser.add_argument("--config", help='CloneConfig fields as JSON, e.g. {"train_steps": 800}')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=_clone)

    demo = subparsers.add_parser("demo", help="the whole story on scikit-learn's digits, in about a minute")
    demo.description = "Train two small digit classifiers, clone digits 5, 6, 7 from one into the other, measure."
    demo.add_argument("--out", default="pnc_demo_patch", help="folder to save the demo patch to")
    demo.add_argument("--overwrite", action="store_true", help="replace the patch files in an existing --out folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)


def check_output_folder(out: str | Path, overwrite: bool) -> Path:
    """``out`` as the folder a patch will be saved to, refused now rather than after the work.

    Raises:
        CommandError: ``out`` is a file or a link, exists without ``overwrite``, or cannot be created.
    """
    path = Path(out)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise CommandError(f"--out {path} exists and is not a folder (a patch is saved as a folder)")
    if path.exists() and not overwrite:
        raise CommandError(f"--out {path} already exists; pass --overwrite to replace its patch files")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"--out {path} cannot be created: {parent} is not a writable folder")
    return path


def json_object(text: str | None, option: str) -> dict[str, Any]:
    """The JSON object given to ``option`` (``{}`` when not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{option} is not valid JSON ({exc}): {text[:200]!r}") from None
    if not isinstance(value, dict):
        raise CommandError(f"{option} must be a JSON object like '{{\"key\": 1}}', got {text[:200]!r}")
    return value


def _clone_config(text: str | None, budget: str | None = None) -> CloneConfig:
    fields = json_object(text, "--config")
    if budget is not None:
        if fields.get("budget", budget) != budget:
            raise CommandError(f"--budget {budget} and --config's budget {fields['budget']!r} disagree; give one")
        fields["budget"] = budget
    known = {f.name for f in dataclasses.fields(CloneConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CommandError(f"--config: CloneConfig has no fields {unknown}; it has {sorted(known)}")
    try:
        return CloneConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"--config: {exc}") from None


def _data_folder(folder: str, option: str) -> Path:
    root = Path(folder)
    if not root.is_dir():
        raise CommandError(f"{option} {root} is not a folder of class sub-folders")
    if not any(child.is_dir() for child in root.iterdir()):
        raise CommandError(f"{option} {root} has no sub-folders: put the images of each class in its own sub-folder")
    return root


def _load_checkpoint(model: nn.Module, path: str, option: str) -> None:
    """Load a safetensors state dict into ``model``, refusing one that does not fit (names and shapes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CommandError(f"{option} {path}: not a readable safetensors file ({exc})", UNUSABLE) from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tensors[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{len(items)} {what} (first: {', '.join(items[:2])})"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
            if items
        ]
        raise CommandError(
            f"{option} {path} does not fit {type(model).__name__}: tensors {'; '.join(problems)}", UNUSABLE
        )
    model.load_state_dict(tensors)


def _processor(spec: str | None, option: str) -> Any:
    """The image processor saved at ``spec`` (a Hub id or folder); ``None`` (the model's own) when not given."""
    if spec is None:
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise CommandError(f"{option} {spec}: no image processor there ({exc})", UNUSABLE) from None


def _model(spec: str, pretrained: bool | None, kwargs: str | None, checkpoint: str | None, role: str) -> nn.Module:
    model = load_model(spec, pretrained=pretrained, **json_object(kwargs, f"--{role}-kwargs"))
    if checkpoint:
        _load_checkpoint(model, checkpoint, f"--{role}-checkpoint")
    return model


def _clone(args: argparse.Namespace) -> int:
    out = check_output_folder(args.out, args.overwrite)
    config = _clone_config(args.config, args.budget)
    data_root = _data_folder(args.data, "--data")
    replay_root = _data_folder(args.replay, "--replay") if args.replay else None
    source = _model(args.source, args.pretrained, args.source_kwargs, args.source_checkpoint, "source")
    target = _model(args.target, args.pretrained, args.target_kwargs, args.target_checkpoint, "target")
    source_processor = _processor(args.source_processor, "--source-processor")
    target_processor = _processor(args.target_processor, "--target-processor")
    patch = clone(  # each model gets the folders' images through its own preprocessing (pnc_surgery.preprocess)
        source,
        target,
        data_root,
        classes=args.classes,
        replay=replay_root,
        config=config,
        seed=args.seed,
        progress=not args.no_progress,
        source_processor=source_processor,
        target_processor=target_processor,
    )
    folder = patch.save_pretrained(out)
    print(patch.summary())
    print(f"saved to {folder}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    out = check_output_folder(args.out, args.overwrite)
    results = run_demo(out, seed=args.seed, progress=not args.no_progress)
    print("pnc_surgery demo: clone digits 5, 6, 7 from a source into a target that knows 0-4 (scikit-learn digits)")
    for key, value in results.items():
        print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")
    return 0
