"""``pnc-surgery clone`` (clone classes from image folders) and ``pnc-surgery demo`` (the built-in story)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..clone import CloneConfig, clone
from ..errors import InvalidInputError
from .models import load_model

__all__ = ["register", "image_folder"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "clone", help="clone classes of a source model into a target model", description=__doc__
    )
    parser.add_argument("--source", required=True, help="timm name or transformers folder of the source model")
    parser.add_argument("--target", required=True, help="timm name or transformers folder of the target model")
    parser.add_argument("--source-checkpoint", help="safetensors state dict of the source")
    parser.add_argument("--target-checkpoint", help="safetensors state dict of the target")
    parser.add_argument("--source-kwargs", help="timm create_model kwargs of the source, as JSON")
    parser.add_argument("--target-kwargs", help="timm create_model kwargs of the target, as JSON")
    parser.add_argument("--pretrained", action="store_true", help="load pretrained timm weights (needs network)")
    parser.add_argument(
        "--data", required=True, help="image folder: one sub-folder per source class (its id or label name)"
    )
    parser.add_argument("--replay", help="image folder of target-domain images (any sub-folders) that protect locality")
    parser.add_argument("--classes", nargs="+", type=int, help="source class ids to clone (default: all sub-folders)")
    parser.add_argument("--out", required=True, help="folder to save the patch to")
    parser.add_argument("--config", help="CloneConfig fields as JSON, e.g. '{\"train_steps\": 800}'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=_clone)

    demo = subparsers.add_parser("demo", help="the whole story on scikit-learn's digits, in about a minute")
    demo.add_argument("--out", default="pnc_demo_patch", help="folder to save the demo patch to")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)


def image_folder(
    folder: str | Path, model: nn.Module, class_ids: dict[str, int] | None = None, labelled: bool = True
) -> list[tuple[torch.Tensor, ...]]:
    """``(image, label)`` pairs from ``folder/<class>/*`` sized for ``model`` (``(image,)`` when not ``labelled``).

    Args:
        folder: one sub-folder per class.
        model: the model whose input size and channels the images take.
        class_ids: sub-folder name -> class id; by default sub-folder names must be integers.
        labelled: whether sub-folder names are class labels (replay folders may use any names).
    """
    from torchvision import datasets, transforms

    root = Path(folder)
    if not root.is_dir():
        raise InvalidInputError(f"{root} is not a folder of class sub-folders")
    expected = backend_for(model).expected_image(model)
    if expected is None:
        raise InvalidInputError(f"{type(model).__name__} does not take images; image folders cannot feed it")
    channels, size = expected
    steps: list[Any] = [transforms.Resize(size)]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    dataset = datasets.ImageFolder(str(root), transform=transforms.Compose(steps))
    if not labelled:
        return [(image,) for image, _ in dataset]
    mapping = {}
    for name in dataset.classes:
        if class_ids is not None and name in class_ids:
            mapping[name] = class_ids[name]
        elif name.isdigit():
            mapping[name] = int(name)
        else:
            raise InvalidInputError(
                f"sub-folder {name!r} of {root} is neither a class id nor a label name of the source"
            )
    to_id = {index: mapping[name] for name, index in dataset.class_to_idx.items()}
    return [(image, to_id[label]) for image, label in dataset]


def _clone(args: argparse.Namespace) -> int:
    source = load_model(
        args.source, pretrained=args.pretrained, kwargs=args.source_kwargs, checkpoint=args.source_checkpoint
    )
    target = load_model(
        args.target, pretrained=args.pretrained, kwargs=args.target_kwargs, checkpoint=args.target_checkpoint
    )
    names = backend_for(source).class_names(source) or []
    data = image_folder(args.data, target, {name: i for i, name in enumerate(names)})
    replay = image_folder(args.replay, target, labelled=False) if args.replay else None
    config = CloneConfig(**json.loads(args.config)) if args.config else CloneConfig()
    patch = clone(
        source,
        target,
        data,
        classes=args.classes,
        replay=replay,
        config=config,
        seed=args.seed,
        progress=not args.no_progress,
    )
    folder = patch.save_pretrained(args.out)
    print(patch.summary())
    print(f"saved to {folder}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    results = run_demo(args.out, seed=args.seed, progress=not args.no_progress)
    print("pnc_surgery demo: clone digits 5, 6, 7 from a source into a target that knows 0-4 (scikit-learn digits)")
    for key, value in results.items():
        print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")
    return 0
