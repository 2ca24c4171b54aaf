"""Entry point of the cloning benchmark: ``python -m benchmarks.run``.

For every architecture pair and seed it trains (or loads from the cache) a target on classes A and a source on
classes B, then for every data level builds one class split (clone data + replay set) and runs every method on
it, with the same models and the same images. Results go to ``--out`` as a markdown table, a JSON file with
every number and two plots (see :mod:`benchmarks.report`).

Examples::

    python -m benchmarks.run --smoke                    # digits, tiny models, one seed: about a minute
    python -m benchmarks.run --dataset fashion --seeds 0 1 2 --levels 1.0 0.3 20 --out results/fashion
    python -m benchmarks.run --pairs "resnet->resnet" "vit->vit" --seeds 0 --levels 0.3
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import report
from .baselines import BASELINES, Ensemble
from .cloning import pnc_methods
from .datasets import (
    ClassSplit,
    ImageDataset,
    class_split,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    select_classes,
    subsample,
)
from .metrics import accuracy_metrics, count_changed, max_abs_diff, median_latencies, safetensors_bytes, snapshot
from .models import PAIRS, count_parameters, trained_model
from .protocol import Context, Hyper, Method
from .training import accuracy, predict_logits, torch_threads

__all__ = ["RunConfig", "SMOKE", "run", "main"]

logger = logging.getLogger("benchmarks")

LOADERS = {"digits": load_digits, "fashion": load_fashion_mnist, "mnist": load_mnist}
METHOD_NAMES = ("pnc", "pnc_no_localize", "pnc_last_stage", "pnc_no_gate", *BASELINES)


@dataclass
class RunConfig:
    """Everything that defines a benchmark run (all of it goes into the JSON).

    Attributes:
        dataset: ``digits``, ``fashion`` or ``mnist``.
        pairs: ``"source->target"`` names from :data:`benchmarks.models.PAIRS`; the default leaves out
            ``convnext->resnet`` (the slowest; ``resnet->efficientnet`` already pairs two CNN families).
        seeds: one cell per seed: model initialisation, clone/replay subsamples, method randomness.
        levels: clone data levels: a float is a fraction of K's train images, an int images per class.
        methods: table rows, from ``METHOD_NAMES``.
        image_size: side of the square input images.
        train_per_class: train the source and target on this many images per class (``None``: all).
        model_steps: optimizer steps (batch 64) to train the source and the target.
        test_per_class: evaluate on this many test images per class (``None``: the whole test split).
        replay_per_class: target-domain images per class of A that every method may use.
        hyper: the baselines' shared budget and hyperparameters.
        clone: ``CloneConfig`` settings shared by every PNC row (default: none, the library's own defaults, whose
            data and step caps keep a clone of the 5,400-image headline cells near LwF's time).
        threads: ``torch.set_num_threads`` (tiny models run fastest on one thread).
        latency_batch: images per timed forward.
    """

    dataset: str = "fashion"
    pairs: list[str] = field(default_factory=lambda: [p for p in PAIRS if p != "convnext->resnet"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    levels: list[float | int] = field(default_factory=lambda: [1.0, 0.3, 20])
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    image_size: int = 16
    train_per_class: int | None = 2000
    model_steps: int = 400
    test_per_class: int | None = 200
    replay_per_class: int = 20
    hyper: Hyper = field(default_factory=Hyper)
    clone: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    latency_batch: int = 128


SMOKE = RunConfig(
    dataset="digits",
    pairs=["resnet->resnet", "hf_vit->hf_vit"],
    seeds=[0],
    levels=[0.3],
    train_per_class=None,
    test_per_class=None,
    model_steps=120,
    hyper=Hyper(steps=30),
    clone={"search_steps": 10, "train_steps": 60, "max_cuts": 2, "max_insertions": 2},
    latency_batch=64,
)
"""A configuration that runs every method in about a minute on two CPU cores (used by the tests)."""


def _parse_level(text: str) -> float | int:
    return int(text) if text.isdigit() else float(text)


def _methods(config: RunConfig) -> dict[str, Method]:
    available = {**pnc_methods(config.clone), **BASELINES}
    unknown = [m for m in config.methods if m not in available]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(available)}")
    return {m: available[m] for m in config.methods}


def _evaluate(method: Method, ctx: Context, reference: dict[str, Any], latency_input: torch.Tensor) -> dict[str, Any]:
    """Run one method on one cell and measure it."""
    outcome = method(ctx)
    test = ctx.split.test
    logits = predict_logits(outcome.model, test)
    row: dict[str, Any] = accuracy_metrics(logits, test.labels, ctx.num_old, reference["predictions"])
    row["target_params_changed"], row["target_buffers_changed"] = count_changed(reference["state"], outcome.changed)
    latency, alone, both = median_latencies(
        [outcome.model, ctx.original_target, Ensemble(ctx.original_target, ctx.source, (0,))], latency_input
    )
    row.update(
        latency_vs_target=latency / alone,
        latency_vs_target_plus_source=latency / both,
        latency_seconds=latency,
        extra_params=outcome.extra_params,
        extra_params_ratio=outcome.extra_params / reference["source_params"],
        patch_bytes=outcome.patch_bytes,
        patch_bytes_ratio=outcome.patch_bytes / reference["source_bytes"],
        clone_seconds=outcome.seconds,
        notes=outcome.notes,
    )
    released = outcome.release() if outcome.release is not None else None
    row["detach_max_abs_diff"] = (
        max_abs_diff(predict_logits(released, test), reference["logits"]) if released is not None else None
    )
    return row


def _cell_reference(target: torch.nn.Module, source: torch.nn.Module, test: ImageDataset) -> dict:
    """What every method of a cell is measured against: the original target's answers, weights and speed."""
    logits = predict_logits(target, test)
    return {
        "logits": logits,
        "predictions": logits.argmax(dim=1),
        "state": snapshot(target),
        "source_state": snapshot(source),
        "source_params": count_parameters(source),
        "source_bytes": safetensors_bytes(source),
    }


def run(config: RunConfig, out: Path, cache: Path, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark and write its report; returns the JSON document.

    Cells run level by level (the headline level first when it is listed first), and the report is rewritten
    after every cell, so a run stopped early still leaves every finished cell's numbers in ``out``.
    """
    started = time.perf_counter()
    train, test = LOADERS[config.dataset](image_size=config.image_size)
    if config.test_per_class:
        test = subsample(test, per_class=config.test_per_class, seed=0)
    methods = _methods(config)
    base = class_split(train, test, replay_per_class=config.replay_per_class)
    document: dict[str, Any] = {
        "config": asdict(config),
        "data": {
            "dataset": config.dataset,
            "source": train.source,
            "target_classes": list(base.target_classes),
            "source_classes": list(base.source_classes),
            "clone_classes": list(base.clone_classes),
            "test_images": len(base.test),
            "same_data": "every method of a (pair, seed, level) cell gets the same clone images and the same "
            f"replay set ({config.replay_per_class} images per class of A)",
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": config.threads,
            "machine": platform.machine(),
            "git": _git_revision(),
        },
        "models": [],
        "rows": [],
        "wall_seconds": 0.0,
    }
    with torch_threads(config.threads):
        for level in config.levels:
            for pair in config.pairs:
                for seed in config.seeds:
                    _run_cell(config, methods, train, test, pair, seed, level, cache, progress, document)
                    document["wall_seconds"] = time.perf_counter() - started
                    report.write(document, out)
    return document


def _run_cell(
    config: RunConfig,
    methods: dict[str, Method],
    train: ImageDataset,
    test: ImageDataset,
    pair: str,
    seed: int,
    level: float | int,
    cache: Path,
    progress: bool,
    document: dict[str, Any],
) -> None:
    """Every method on one (pair, seed, level) cell; appends its rows (and the models' record) to ``document``."""
    split = class_split(train, test, clone_level=level, replay_per_class=config.replay_per_class, seed=seed)
    common = dict(
        dataset_name=config.dataset,
        image_size=config.image_size,
        steps=config.model_steps,
        seed=seed,
        cache_dir=cache,
        train_per_class=config.train_per_class,
        progress=progress,
    )
    source_arch, target_arch = PAIRS[pair]
    source, source_info = trained_model(source_arch, "source", split.source_train, split.source_classes, **common)
    target, target_info = trained_model(target_arch, "target", split.target_train, split.target_classes, **common)
    if not any(m["pair"] == pair and m["seed"] == seed for m in document["models"]):
        document["models"].append(_model_record(pair, seed, split, source, target, source_info, target_info))
    reference = _cell_reference(target, source, split.test)
    for name, method in methods.items():
        logger.info("%s seed %d level %s: %s", pair, seed, level, name)
        ctx = Context(source, copy.deepcopy(target), target, split, config.hyper, seed, progress)
        row = _evaluate(method, ctx, reference, split.test.images[: config.latency_batch])
        assert count_changed(reference["state"], target) == (0, 0), f"{name} wrote the original target"
        assert count_changed(reference["source_state"], source) == (0, 0), f"{name} wrote the source"
        document["rows"].append(
            {
                "pair": pair,
                "seed": seed,
                "level": level,
                "method": name,
                "clone_images": len(split.clone),
                "replay_images": len(split.replay),
                **row,
            }
        )


def _git_revision() -> str | None:
    """The checked-out commit (with ``+dirty`` when tracked files differ), so results name their code."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _model_record(
    pair: str,
    seed: int,
    split: ClassSplit,
    source: torch.nn.Module,
    target: torch.nn.Module,
    source_info: dict,
    target_info: dict,
) -> dict[str, Any]:
    """Accuracies of the trained models: the target on A's test images, the source on K's (acc_new's ceiling)."""
    test_old = select_classes(split.test, range(split.num_old))
    test_new = select_classes(split.test, range(split.num_old, split.num_old + len(split.clone_classes)))
    source_logits = predict_logits(source, test_new)[:, list(split.clone_source_ids)]
    source_on_k = (source_logits.argmax(1) == test_new.labels - split.num_old).float().mean().item()
    return {
        "pair": pair,
        "seed": seed,
        "target_acc_on_A": accuracy(target, test_old),
        "source_acc_on_K_among_K": source_on_k,
        "source_params": count_parameters(source),
        "target_params": count_parameters(target),
        "source": source_info,
        "target": target_info,
    }


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    config = SMOKE if args.smoke else RunConfig()
    overrides = {
        key: value
        for key, value in {
            "dataset": args.dataset,
            "pairs": args.pairs,
            "seeds": args.seeds,
            "levels": args.levels,
            "methods": args.methods,
            "image_size": args.image_size,
            "train_per_class": args.train_per_class,
            "model_steps": args.model_steps,
            "test_per_class": args.test_per_class,
            "threads": args.threads,
        }.items()
        if value is not None
    }
    if args.steps is not None:
        overrides["hyper"] = replace(config.hyper, steps=args.steps)
    if args.clone_config is not None:
        overrides["clone"] = json.loads(args.clone_config)
    return replace(config, **overrides)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="digits, tiny models, one seed (about a minute)")
    parser.add_argument("--dataset", choices=sorted(LOADERS))
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--levels", nargs="+", type=_parse_level, help="fractions (0.3) or images per class (20)")
    parser.add_argument("--methods", nargs="+", choices=METHOD_NAMES)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--train-per-class", type=int)
    parser.add_argument("--model-steps", type=int)
    parser.add_argument("--test-per-class", type=int)
    parser.add_argument("--steps", type=int, help="optimizer steps of every trained baseline")
    parser.add_argument("--clone-config", help="JSON of CloneConfig settings shared by the PNC rows")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/<dataset>)")
    parser.add_argument("--cache", type=Path, default=Path("results/cache"), help="trained-model cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = _config_from_args(args)
    out = args.out or Path("results") / ("smoke" if args.smoke else config.dataset)
    document = run(config, out, args.cache, progress=not args.quiet)
    print(report.markdown(document))
    return document


if __name__ == "__main__":
    main()
