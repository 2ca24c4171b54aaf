"""What a clone costs: ``clone()`` wall time against the LwF baseline, and against the work it has to do.

Two tables, both measured in one process so that only ratios count on a shared machine:

* **ratio**: per pair, the default ``pnc_surgery.clone`` against LwF as :mod:`benchmarks.baselines` trains it (same
  clone data, same replay set, same models), with ``acc_all`` and locality beside the time. Pairs are the
  benchmark's narrow models at 16 px and default-width timm models at 32 px (a ResNet, a ConvNeXt, a small ViT).
* **cost**: clone seconds against (source FLOPs per image x clone images) for a few model sizes and two data sizes,
  so a user can predict the wait.
* **forward**: the patched target's forward against the target alone plus the pruned branch run alone, at tiny
  and at ResNet-50 size.

Run ``python -m benchmarks.clone_cost`` (``--help`` for the options); ``--json`` writes every row.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pnc_surgery.clone import CloneConfig, clone

from .baselines import lwf
from .datasets import ClassSplit, class_split, subsample
from .metrics import accuracy_metrics, patch_bytes, safetensors_bytes
from .models import ARCHS, PAIRS, Arch, trained_model
from .protocol import Context, Hyper
from .run import LOADERS
from .training import predict_logits, torch_threads

__all__ = ["WIDE_ARCHS", "WIDE_PAIRS", "source_flops", "ratio_row", "cost_row", "main"]

WIDE_ARCHS: dict[str, Arch] = {
    "resnet10t": Arch("timm", "resnet10t"),
    "convnext_atto": Arch("timm", "convnext_atto"),
    "vit_tiny": Arch("timm", "vit_tiny_patch16_224", {"patch_size": 8}, lr=1e-3),
    "resnet26": Arch("timm", "resnet26"),
}
"""Default-width timm models (only the ViT's patch is shrunk so that 32 px makes a 4x4 grid)."""

WIDE_PAIRS: dict[str, tuple[str, str]] = {
    "convnext_atto->resnet10t": ("convnext_atto", "resnet10t"),
    "vit_tiny->resnet10t": ("vit_tiny", "resnet10t"),
    "resnet10t->vit_tiny": ("resnet10t", "vit_tiny"),
}
"""``"source->target"`` pairs at default width: the issue's pair, a ViT source and a ViT target."""

COST_SOURCES = ("resnet10t", "convnext_atto", "vit_tiny", "resnet26")
"""Sources of the cost table, small to large (the target is always ``resnet10t``)."""


def _register() -> None:
    """Make the default-width architectures known to :func:`benchmarks.models.trained_model` (its cache key)."""
    for name, arch in WIDE_ARCHS.items():
        ARCHS.setdefault(name, arch)


def source_flops(model: nn.Module, example: torch.Tensor) -> float:
    """Floating-point operations of one forward of ``model`` on one ``example`` image (multiply-adds x 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(example[:1])
    return float(counter.get_total_flops())


DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"level": 1.0, "replay_per_class": 10, "test_per_class": None, "train_per_class": None},
    "fashion": {"level": 0.3, "replay_per_class": 20, "test_per_class": 200, "train_per_class": 2000},
}
"""The ratio table's data: scikit-learn's digits (361 clone images) or the Fashion benchmark's headline cell (5,400
clone images; its defaults, so that the benchmark's trained models are reused from ``--cache``)."""


def _split(dataset: str, image_size: int, level: float | int | None, seed: int) -> ClassSplit:
    """The protocol's split of ``dataset`` at ``level`` (``None``: the dataset's own level)."""
    settings = DATASETS[dataset]
    train, test = LOADERS[dataset](image_size=image_size)
    if settings["test_per_class"]:
        test = subsample(test, per_class=settings["test_per_class"], seed=0)
    level = settings["level"] if level is None else level
    return class_split(train, test, clone_level=level, replay_per_class=settings["replay_per_class"], seed=seed)


def _models(
    dataset: str, pair: tuple[str, str], split: ClassSplit, image_size: int, seed: int, cache: Path, steps: int
) -> tuple[nn.Module, nn.Module]:
    common = dict(
        dataset_name=dataset,
        image_size=image_size,
        steps=steps,
        seed=seed,
        cache_dir=cache,
        train_per_class=DATASETS[dataset]["train_per_class"],
        progress=False,
    )
    source, _ = trained_model(pair[0], "source", split.source_train, split.source_classes, **common)
    target, _ = trained_model(pair[1], "target", split.target_train, split.target_classes, **common)
    return source, target


def _scores(model: nn.Module, split: ClassSplit, reference: torch.Tensor) -> dict[str, float]:
    logits = predict_logits(model, split.test)
    metrics = accuracy_metrics(logits, split.test.labels, split.num_old, reference)
    return {"acc_all": round(100 * metrics["acc_all"], 2), "locality": round(100 * metrics["locality"], 2)}


def timed_clone(
    source: nn.Module, target: nn.Module, split: ClassSplit, config: CloneConfig, seed: int
) -> tuple[Any, float]:
    """The patch of ``clone()`` on the split's clone classes (with its replay set), and its wall seconds."""
    started = time.perf_counter()
    patch = clone(
        source,
        target,
        split.clone,
        classes=list(split.clone_source_ids),
        replay=split.replay,
        config=config,
        seed=seed,
        progress=False,
    )
    return patch, time.perf_counter() - started


def ratio_row(
    name: str,
    pair: tuple[str, str],
    image_size: int,
    seed: int,
    cache: Path,
    config: CloneConfig,
    steps: int,
    dataset: str = "digits",
) -> dict[str, Any]:
    """One pair: default clone and LwF on the same split and models; seconds, ratio, ``acc_all``, locality, bytes."""
    split = _split(dataset, image_size, None, seed)
    source, target = _models(dataset, pair, split, image_size, seed, cache, steps)
    reference = predict_logits(target, split.test).argmax(-1)
    context = Context(source, copy.deepcopy(target), target, split, Hyper(), seed)
    outcome = lwf(context)
    lwf_scores = _scores(outcome.model, split, reference)
    patch, seconds = timed_clone(source, target, split, config, seed)
    with patch.attached(target):
        clone_scores = _scores(target, split, reference)
    return {
        "pair": name,
        "dataset": dataset,
        "image_size": image_size,
        "clone_images": len(split.clone),
        "replay_images": len(split.replay),
        "lwf_seconds": round(outcome.seconds, 2),
        "clone_seconds": round(seconds, 2),
        "ratio": round(seconds / outcome.seconds, 2),
        "clone_acc_all": clone_scores["acc_all"],
        "clone_locality": clone_scores["locality"],
        "lwf_acc_all": lwf_scores["acc_all"],
        "lwf_locality": lwf_scores["locality"],
        "patch_bytes_ratio": round(patch_bytes(patch) / safetensors_bytes(source), 3),
        "cut": patch.metrics.get("cut"),
        "insertion": patch.metrics.get("insertion"),
        "stage_seconds": patch.metrics.get("stage_seconds"),
    }


def cost_row(source_arch: str, level: float | int, seed: int, cache: Path, config: CloneConfig, steps: int) -> dict:
    """Clone seconds of ``source_arch`` into a ``resnet10t`` target at 32 px with ``level`` clone data."""
    split = _split("digits", 32, level, seed)
    source, target = _models("digits", (source_arch, "resnet10t"), split, 32, seed, cache, steps)
    flops = source_flops(source, split.clone.images[:1])
    patch, seconds = timed_clone(source, target, split, config, seed)
    work = flops * len(split.clone)
    return {
        "source": source_arch,
        "clone_images": len(split.clone),
        "source_mflops": round(flops / 1e6, 2),
        "work_gflops": round(work / 1e9, 2),
        "clone_seconds": round(seconds, 2),
        "seconds_per_tflop": round(seconds / (work / 1e12), 1),
        "cut": patch.metrics.get("cut"),
        "insertion": patch.metrics.get("insertion"),
        "stage_seconds": patch.metrics.get("stage_seconds"),
    }


FORWARD_CASES: dict[str, dict[str, Any]] = {
    "tiny": {
        "kwargs": {"in_chans": 1, "channels": (16, 32, 64, 128)},
        "name": "resnet18",
        "size": 16,
        "batch": 128,
        "cut": "layer1",
        "repeats": 41,
    },
    "resnet50": {"kwargs": {}, "name": "resnet50", "size": 224, "batch": 4, "cut": "layer1", "repeats": 9},
}
"""The patched-forward cases: a tiny benchmark ResNet and a ResNet-50, an early cut pruned to 0.2; ``repeats``
timed calls of each (after two warm-up calls)."""


def _interleaved_ms(fns: dict[str, Any], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each ``fns`` entry (a function returning a context to time the call in), the calls
    taken in turn within every repeat so that a change in the machine's load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for repeat in range(warmup + repeats):
        for name, fn in fns.items():
            with fn() as call:
                started = time.perf_counter()
                call()
                if repeat >= warmup:
                    times[name].append(1e3 * (time.perf_counter() - started))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


@torch.no_grad()
def forward_row(case: str, keep_ratio: float = 0.2) -> dict[str, Any]:
    """Patched forward P against the target alone T and the pruned branch run alone B (adapter included)."""
    from pnc_surgery import Patch
    from pnc_surgery.backends.timm import create_model
    from pnc_surgery.branch import capture_features
    from pnc_surgery.localize import find_prune_groups, keep_indices, prune

    spec = FORWARD_CASES[case]
    torch.manual_seed(0)
    source, target = (create_model(spec["name"], num_classes=5, **spec["kwargs"]).eval() for _ in range(2))
    channels = spec["kwargs"].get("in_chans", 3)
    x = torch.randn(spec["batch"], channels, spec["size"], spec["size"])
    cut = spec["cut"]
    patch = Patch.assemble(source, target, cut, cut, [0, 1, 2], source_input=x[:2], target_input=x[:2]).eval()
    feature = capture_features(target, [cut], x)[cut]
    groups = find_prune_groups(patch.branch, feature[:2])
    prune(patch.branch, groups, keep_indices(groups, {g.consumer: torch.ones(g.size) for g in groups}, keep_ratio))
    plain = lambda call: contextlib.nullcontext(call)  # noqa: E731

    @contextlib.contextmanager
    def attached() -> Any:
        with patch.attached(target):
            yield lambda: target(x)

    ms = _interleaved_ms(
        {
            "target": lambda: plain(lambda: target(x)),
            "branch": lambda: plain(lambda: patch.branch(patch.adapter(feature))),
            "patched": attached,
        },
        spec["repeats"],
    )
    alone, branch, patched = ms["target"], ms["branch"], ms["patched"]
    return {
        "case": case,
        "cut": cut,
        "keep_ratio": keep_ratio,
        "batch": spec["batch"],
        "target_ms": round(alone, 2),
        "branch_ms": round(branch, 2),
        "patched_ms": round(patched, 2),
        "patched_vs_target_plus_branch": round(patched / (alone + branch), 3),
        "patched_vs_target": round(patched / alone, 3),
    }


def _print(rows: Sequence[dict], keys: Sequence[str]) -> None:
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k)) for k in keys))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clone_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tables", nargs="+", default=["ratio", "cost", "forward"], choices=["ratio", "cost", "forward"]
    )
    parser.add_argument("--pairs", nargs="+", default=None, help="pair names (default: benchmark + wide pairs)")
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="digits",
        help="data of the ratio table: digits (361 clone images) or fashion (the benchmark's 5,400; its models "
        "train with --model-steps 400)",
    )
    parser.add_argument("--budget", default="default", help="CloneConfig(budget=...)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="other CloneConfig fields, values as Python literals (e.g. cost_weight=0)",
    )
    parser.add_argument("--sources", nargs="+", default=list(COST_SOURCES), help="sources of the cost table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-steps", type=int, default=300, help="training steps of the source and target")
    parser.add_argument("--cache", type=Path, default=Path(".cache/pnc_benchmark"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    args = parser.parse_args(argv)
    _register()
    overrides = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = CloneConfig(budget=args.budget, **overrides)
    document: dict[str, Any] = {"budget": args.budget, "ratio": [], "cost": [], "forward": []}
    pairs = {**{k: (v, 16) for k, v in PAIRS.items()}, **{k: (v, 32) for k, v in WIDE_PAIRS.items()}}
    with torch_threads(args.threads):
        if "ratio" in args.tables:
            for name in args.pairs or list(pairs):
                pair, size = pairs[name]
                row = ratio_row(name, pair, size, args.seed, args.cache, config, args.model_steps, args.dataset)
                document["ratio"].append(row)
                print(json.dumps(row), flush=True)
        if "cost" in args.tables:
            for source_arch in args.sources:
                for level in (0.3, 1.0):
                    row = cost_row(source_arch, level, args.seed, args.cache, config, args.model_steps)
                    document["cost"].append(row)
                    print(json.dumps(row), flush=True)
        if "forward" in args.tables:
            for case in FORWARD_CASES:
                row = forward_row(case)
                document["forward"].append(row)
                print(json.dumps(row), flush=True)
    keys = [
        "pair",
        "clone_seconds",
        "lwf_seconds",
        "ratio",
        "clone_acc_all",
        "clone_locality",
        "lwf_acc_all",
        "lwf_locality",
        "patch_bytes_ratio",
    ]
    if document["ratio"]:
        _print(document["ratio"], keys)
    if document["cost"]:
        _print(
            document["cost"],
            ["source", "clone_images", "source_mflops", "work_gflops", "clone_seconds", "seconds_per_tflop", "cut"],
        )
    if document["forward"]:
        _print(
            document["forward"],
            [
                "case",
                "cut",
                "keep_ratio",
                "batch",
                "target_ms",
                "branch_ms",
                "patched_ms",
                "patched_vs_target_plus_branch",
                "patched_vs_target",
            ],
        )
    if args.json:
        args.json.write_text(json.dumps(document, indent=1))
    return document


if __name__ == "__main__":
    main()
