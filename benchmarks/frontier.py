"""PNC's accuracy-locality frontier beside the baselines and an oracle: ``python -m benchmarks.frontier``.

On the cells of the main benchmark (:mod:`benchmarks.run`: same data, models, splits and budgets), every cell is
cloned once; the gate is then refitted on the same evidence at every false-positive budget of ``--budgets``, which
traces PNC's whole ``acc_all``-vs-locality curve. Beside it: fine-tuning, LwF and EWC on the same cells, and the
**oracle**: the target's architecture trained jointly on A and K with all of their train images (the upper bound
a user compares against; its "locality" is its agreement with the target on A's test images).

Writes ``frontier.json``, ``frontier.md`` and ``frontier.png`` to ``--out`` after every cell::

    python -m benchmarks.frontier --out results/frontier
    python -m benchmarks.frontier --pairs "resnet->resnet" --seeds 0 --out results/frontier_quick

``--dump DIR`` also saves every cell's gate evidence, for ``python -m benchmarks.gate_ceiling DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pnc_surgery.clone import CloneConfig, clone
from pnc_surgery.gate import AUTO_ALTERNATIVES

from . import report
from .baselines import BASELINES
from .datasets import class_split, select_classes, subsample
from .metrics import accuracy_metrics
from .models import PAIRS, trained_model
from .pair_matrix import fit_evidence, gate_inputs, gate_outcome, refit_gate, save_evidence
from .protocol import Context
from .run import LOADERS, RunConfig
from .training import predict_logits, torch_threads

__all__ = ["BUDGETS", "BASELINE_ROWS", "cell_rows", "markdown", "main"]

logger = logging.getLogger("benchmarks.frontier")

BUDGETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
"""Gate false-positive budgets (``CloneConfig.max_false_positive_rate``) the curve is traced at."""

BASELINE_ROWS = ("finetune", "lwf", "ewc")


def cell_rows(
    config: RunConfig,
    train: Any,
    test: Any,
    pair: str,
    seed: int,
    level: float | int,
    cache: Path,
    budgets: Sequence[float],
    progress: bool = False,
    dump: Path | None = None,
) -> list[dict[str, Any]]:
    """Every row of one (pair, seed) cell: PNC at each budget, the baselines and the oracle; with ``dump``, the
    cell's gate evidence is saved there too (:func:`benchmarks.pair_matrix.save_evidence`)."""
    split = class_split(train, test, clone_level=level, replay_per_class=config.replay_per_class, seed=seed)
    common = {
        "dataset_name": config.dataset,
        "image_size": config.image_size,
        "steps": config.model_steps,
        "seed": seed,
        "cache_dir": cache,
        "train_per_class": config.train_per_class,
        "progress": progress,
    }
    source_arch, target_arch = PAIRS[pair]
    source, _ = trained_model(source_arch, "source", split.source_train, split.source_classes, **common)
    target, _ = trained_model(target_arch, "target", split.target_train, split.target_classes, **common)
    classes = split.target_classes + split.clone_classes
    joint = select_classes(train, classes, relabel=True)
    oracle, _ = trained_model(target_arch, "oracle", joint, classes, **common)
    labels, num_old = split.test.labels, split.num_old
    reference = predict_logits(target, split.test).argmax(1)
    base = {"pair": pair, "seed": seed, "level": level}

    rows = []
    start = time.perf_counter()
    patch = clone(
        source,
        target,
        split.clone,
        classes=list(split.clone_source_ids),
        replay=split.replay,
        config=CloneConfig(**config.clone),
        seed=seed,
        progress=progress,
    )
    clone_seconds = time.perf_counter() - start
    seen, _ = gate_inputs(patch, target, split.test)
    evidence = fit_evidence(patch, target, split)
    if dump is not None:
        save_evidence(dump, pair, seed, evidence, seen, labels, num_old, {"pair": pair, "seed": seed})
    for budget in budgets:  # as clone's "auto" gate would fit at that budget
        gate, fit = refit_gate("novelty", evidence, budget, seed, also_try=AUTO_ALTERNATIVES)
        rows.append(
            {
                **base,
                "method": "pnc",
                "budget": budget,
                "gate": gate.kind,
                "clone_seconds": clone_seconds,
                **gate_outcome(gate, seen, labels, num_old),
                "gate_fit": fit,
            }
        )
    gate, _ = refit_gate("learned", evidence, CloneConfig().max_false_positive_rate, seed)
    rows.append(
        {
            **base,
            "method": "pnc_learned_gate",
            "budget": CloneConfig().max_false_positive_rate,
            **gate_outcome(gate, seen, labels, num_old),
        }
    )
    for name in BASELINE_ROWS:
        ctx = Context(source, copy.deepcopy(target), target, split, config.hyper, seed, progress)
        outcome = BASELINES[name](ctx)
        rows.append(
            {
                **base,
                "method": name,
                **accuracy_metrics(predict_logits(outcome.model, split.test), labels, num_old, reference),
            }
        )
    oracle_logits = predict_logits(oracle, split.test)
    rows.append({**base, "method": "oracle", **accuracy_metrics(oracle_logits, labels, num_old, reference)})
    return rows


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    return 100 * sum(r[key] for r in rows) / len(rows)


def markdown(document: dict[str, Any]) -> str:
    """Mean ``acc_all`` / locality over the cells: PNC per budget, the baselines, the oracle; and PNC against the
    best of fine-tuning, LwF and EWC at locality >= 99% and at the baselines' own locality."""
    rows = document["rows"]
    cells = sorted({(r["pair"], r["seed"]) for r in rows if r["method"] == "oracle"})
    done = [r for r in rows if (r["pair"], r["seed"]) in cells]
    lines = [
        f"{len(cells)} cells ({', '.join(f'{p} seed {s}' for p, s in cells)})",
        "",
        "| method | budget | acc_all | locality | acc_new | acc_old |",
        "|---|---|---|---|---|---|",
    ]
    curve = []
    for budget in sorted({r["budget"] for r in done if r["method"] == "pnc"}):
        chosen = [r for r in done if r["method"] == "pnc" and r["budget"] == budget]
        curve.append((budget, _mean(chosen, "acc_all"), _mean(chosen, "locality")))
        lines.append(f"| pnc | {budget:g} | {curve[-1][1]:.1f} | {curve[-1][2]:.2f} | {_mean(chosen, 'acc_k'):.1f} | |")
    summary = {}
    for method in ("pnc_learned_gate", *BASELINE_ROWS, "oracle"):
        chosen = [r for r in done if r["method"] == method]
        if chosen:
            new = "acc_k" if method.startswith("pnc") else "acc_new"
            summary[method] = (_mean(chosen, "acc_all"), _mean(chosen, "locality"))
            old = "" if method.startswith("pnc") else f"{_mean(chosen, 'acc_old'):.1f}"
            lines.append(
                f"| {method} | {chosen[0].get('budget', '')} | {summary[method][0]:.1f} | {summary[method][1]:.2f} "
                f"| {_mean(chosen, new):.1f} | {old} |"
            )
    baselines = [summary[m] for m in BASELINE_ROWS if m in summary]
    if curve and baselines:
        best = max(acc for acc, _ in baselines)
        their_locality = sum(loc for _, loc in baselines) / len(baselines)
        local = [acc for _, acc, loc in curve if loc >= 99.0]
        at_theirs = max((acc for _, acc, loc in curve if loc >= their_locality), default=None)
        lines += [
            "",
            f"Best of fine-tuning / LwF / EWC: acc_all {best:.1f}; their mean locality {their_locality:.1f}.",
            f"PNC at locality >= 99: acc_all {max(local):.1f} ({max(local) - best:+.1f}; target +3.5)."
            if local
            else "PNC reaches locality >= 99 at no budget.",
            f"PNC at locality >= {their_locality:.1f}: acc_all {at_theirs:.1f} ({at_theirs - best:+.1f}; target +5)."
            if at_theirs is not None
            else "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__.split("\n\n")[0])
    defaults = RunConfig()
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=defaults.pairs)
    parser.add_argument("--seeds", nargs="+", type=int, default=defaults.seeds)
    parser.add_argument("--level", type=float, default=0.3, help="clone data: fraction of K's train images")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--out", type=Path, default=Path("results/frontier"))
    parser.add_argument("--cache", type=Path, default=Path("results/cache"))
    parser.add_argument("--dump", type=Path, default=None, help="also save every cell's gate evidence here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = RunConfig(pairs=args.pairs, seeds=args.seeds)
    train, test = LOADERS[config.dataset](image_size=config.image_size)
    test = subsample(test, per_class=config.test_per_class, seed=0)
    document: dict[str, Any] = {"config": asdict(config), "level": args.level, "budgets": args.budgets, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch_threads(config.threads):
        for seed in config.seeds:  # every pair at the first seed first: a run stopped early still covers them all
            for pair in config.pairs:
                logger.info("%s seed %d", pair, seed)
                document["rows"] += cell_rows(
                    config, train, test, pair, seed, args.level, args.cache, args.budgets, dump=args.dump
                )
                document["wall_seconds"] = time.perf_counter() - started
                (args.out / "frontier.json").write_text(json.dumps(document, indent=1))
                (args.out / "frontier.md").write_text(markdown(document) + "\n")
                report.frontier_plot(document, args.out / "frontier.png")
    print(markdown(document))
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return document


if __name__ == "__main__":
    main()
