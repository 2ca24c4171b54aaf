"""How far any linear gate can go at a locality budget: ``python -m benchmarks.separability``.

A patch keeps the target's answers on its own classes only where its gate tells a cloned-class input from a
target-class input. This measures, for every (pair, seed) of the benchmark, the best that a linear function of
some features can do: a logistic regression of cloned classes against the target's classes, fitted on the test
split itself, thresholded so that ``budget`` of the target's test images pass. It reports the share of each cloned
class's test images that pass, and ``acc_all`` if the patch added exactly those images and answered every one of
them right (the rest as the target does).

The features are the target's pre-logits (what the patch's gate sees), optionally with the source's pre-logits
and the raw pixels (everything any patch could compute). With ``--folds k`` (default 5) every test image is
scored by a probe fitted on the other folds: a gate with (k-1)/k of the test split as its replay set, far more
than the benchmark's. ``--folds 0`` fits and scores the same images, which high-dimensional features overfit::

    python -m benchmarks.separability --dataset fashion --seeds 0 1 2 --features target target+source+pixels
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .datasets import class_split, subsample
from .models import PAIRS, head_name, trained_model
from .run import LOADERS, RunConfig

__all__ = ["FEATURES", "pre_logits", "linear_bound", "main"]

FEATURES = ("target", "target+source", "target+source+pixels")
"""What a probe may see: the target's pre-logits, plus the source's, plus the raw pixels."""


@torch.no_grad()
def pre_logits(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of the model's classifier and its logits, for every image."""
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(head_name(model)).register_forward_pre_hook(
        lambda _, args: captured.append(args[0].flatten(1))
    )
    logits = []
    try:
        for batch in images.split(batch_size):
            output = model(batch)
            logits.append(output if isinstance(output, torch.Tensor) else output.logits)
    finally:
        hook.remove()
    return torch.cat(captured), torch.cat(logits)


def linear_bound(
    features: torch.Tensor,
    labels: torch.Tensor,
    target_correct: torch.Tensor,
    num_old: int,
    budget: float,
    strengths: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    folds: int = 5,
) -> dict[str, Any]:
    """Per cloned class, the share of its images a linear gate passes at ``budget`` of the target's; the implied
    ``acc_all`` ceiling (every passed image answered right, every other one answered as the target does). The
    best of several regularisation strengths (``C``), so that the bound is not an under-fitted probe's; scores
    are out-of-fold with ``folds`` >= 2, in-sample with 0."""
    cloned = labels >= num_old
    x, y = features.double().numpy(), cloned.numpy()
    splits = (
        list(StratifiedKFold(folds, shuffle=True, random_state=0).split(x, labels.numpy()))
        if folds
        else [(slice(None), slice(None))]
    )
    best: dict[str, Any] = {}
    for strength in strengths:
        scores = torch.zeros(len(labels), dtype=torch.float64)
        for fit, held in splits:
            probe = make_pipeline(
                StandardScaler(), LogisticRegression(C=strength, class_weight="balanced", max_iter=5000)
            )
            scores[held] = torch.from_numpy(probe.fit(x[fit], y[fit]).decision_function(x[held]))
        threshold = torch.quantile(scores[~cloned], 1.0 - budget)
        passed = scores > threshold
        correct = (target_correct & ~cloned & ~passed).sum() + (passed & cloned).sum()
        ceiling = round(correct.item() / len(labels), 4)
        if not best or ceiling > best["acc_all_ceiling"]:
            per_class = {int(c): round(passed[labels == c].float().mean().item(), 4) for c in labels[cloned].unique()}
            best = {"pass_rate": per_class, "acc_all_ceiling": ceiling, "C": strength}
    return best


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.separability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion", choices=sorted(LOADERS))
    parser.add_argument("--pairs", nargs="+", default=RunConfig().pairs, choices=sorted(PAIRS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--level", type=float, default=0.3)
    parser.add_argument("--image-size", type=int, default=RunConfig().image_size)
    parser.add_argument(
        "--budget", type=float, default=0.01, help="share of the target's test images the gate may pass"
    )
    parser.add_argument("--features", nargs="+", default=["target"], choices=FEATURES, help="what the probe sees")
    parser.add_argument("--folds", type=int, default=5, help="score out of fold (0: in-sample, optimistic)")
    parser.add_argument("--cache", type=Path, default=Path("results/cache"))
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    config = RunConfig(dataset=args.dataset, image_size=args.image_size)
    train, test = LOADERS[args.dataset](image_size=config.image_size)
    test = subsample(test, per_class=config.test_per_class, seed=0)
    rows = []
    for pair in args.pairs:
        for seed in args.seeds:
            split = class_split(
                train, test, clone_level=args.level, replay_per_class=config.replay_per_class, seed=seed
            )
            common = dict(
                dataset_name=args.dataset,
                image_size=config.image_size,
                steps=config.model_steps,
                seed=seed,
                cache_dir=args.cache,
                train_per_class=config.train_per_class,
                progress=False,
            )
            source_arch, target_arch = PAIRS[pair]
            target, _ = trained_model(target_arch, "target", split.target_train, split.target_classes, **common)
            target_features, logits = pre_logits(target, split.test.images)
            parts = {"target": target_features, "pixels": split.test.images.flatten(1)}
            if any("source" in name for name in args.features):
                source, _ = trained_model(source_arch, "source", split.source_train, split.source_classes, **common)
                parts["source"] = pre_logits(source, split.test.images)[0]
            correct = logits.argmax(-1) == split.test.labels
            for name in args.features:
                features = torch.cat([parts[part] for part in name.split("+")], dim=1)
                bound = linear_bound(features, split.test.labels, correct, split.num_old, args.budget, folds=args.folds)
                rows.append({"pair": pair, "seed": seed, "features": name, **bound})
                print(json.dumps(rows[-1]), flush=True)
    means = {}
    for name in args.features:
        ceilings = [r["acc_all_ceiling"] for r in rows if r["features"] == name]
        means[name] = sum(ceilings) / len(ceilings)
    fitted = f"{args.folds}-fold out-of-fold" if args.folds else "in-sample"
    for name, mean in means.items():
        print(
            f"mean acc_all ceiling of a linear gate on {name} ({fitted}) "
            f"at {args.budget:.0%} of the target's images: {100 * mean:.1f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"budget": args.budget, "folds": args.folds, "rows": rows, "mean_acc_all_ceiling": means}
        args.out.write_text(json.dumps(summary, indent=1))
    return rows


if __name__ == "__main__":
    main()
