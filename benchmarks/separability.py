"""How far any linear gate on the target's features can go at a locality budget: ``python -m benchmarks.separability``.

A patch keeps the target's answers on its own classes only where its gate tells a cloned-class input from a
target-class input. This measures, for every (pair, seed) of the benchmark, the best that a linear function of
the target's pre-logits can do: a logistic regression of cloned classes against the target's classes, fitted on
the test split itself (in-sample, so an optimistic bound), thresholded so that ``budget`` of the target's test
images pass. It reports the share of each cloned class's test images that pass, and ``acc_all`` if the patch
added exactly those images and answered every one of them right (the rest as the target does)::

    python -m benchmarks.separability --dataset fashion --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pnc_surgery.datasets import class_split, subsample

from .models import PAIRS, head_name, trained_model
from .run import LOADERS, RunConfig

__all__ = ["pre_logits", "linear_bound", "main"]


@torch.no_grad()
def pre_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of the model's classifier and its logits, for every image."""
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(head_name(model)).register_forward_pre_hook(lambda _, args: captured.append(args[0].flatten(1)))
    logits = []
    try:
        for batch in images.split(batch_size):
            output = model(batch)
            logits.append(output if isinstance(output, torch.Tensor) else output.logits)
    finally:
        hook.remove()
    return torch.cat(captured), torch.cat(logits)


def linear_bound(
    features: torch.Tensor, labels: torch.Tensor, target_correct: torch.Tensor, num_old: int, budget: float,
    strengths: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
) -> dict[str, Any]:
    """Per cloned class, the share of its images a linear gate passes at ``budget`` of the target's; the implied
    ``acc_all`` ceiling (every passed image answered right, every other one answered as the target does). The
    best of several regularisation strengths (``C``), so that the bound is not an under-fitted probe's."""
    cloned = labels >= num_old
    standard = StandardScaler().fit_transform(features.numpy())
    best: dict[str, Any] = {}
    for strength in strengths:
        probe = LogisticRegression(C=strength, class_weight="balanced", max_iter=5000).fit(standard, cloned.numpy())
        scores = torch.from_numpy(probe.decision_function(standard))
        threshold = torch.quantile(scores[~cloned].double(), 1.0 - budget)
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
    parser.add_argument("--budget", type=float, default=0.01, help="share of the target's test images the gate may pass")
    parser.add_argument("--cache", type=Path, default=Path("results/cache"))
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    config = RunConfig(dataset=args.dataset, image_size=args.image_size)
    train, test = LOADERS[args.dataset](image_size=config.image_size)
    test = subsample(test, per_class=config.test_per_class, seed=0)
    rows = []
    for pair in args.pairs:
        for seed in args.seeds:
            split = class_split(train, test, clone_level=args.level, replay_per_class=config.replay_per_class, seed=seed)
            target, _ = trained_model(
                PAIRS[pair][1], "target", split.target_train, split.target_classes, dataset_name=args.dataset,
                image_size=config.image_size, steps=config.model_steps, seed=seed, cache_dir=args.cache,
                train_per_class=config.train_per_class, progress=False,
            )
            features, logits = pre_logits(target, split.test.images)
            correct = logits.argmax(-1) == split.test.labels
            row = {"pair": pair, "seed": seed, **linear_bound(features, split.test.labels, correct, split.num_old, args.budget)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    mean = sum(r["acc_all_ceiling"] for r in rows) / len(rows)
    print(f"mean acc_all ceiling of a linear gate at {args.budget:.0%} of the target's images: {100 * mean:.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"budget": args.budget, "rows": rows, "mean_acc_all_ceiling": mean}, indent=1))
    return rows


if __name__ == "__main__":
    main()
