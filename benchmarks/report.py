"""Turn the benchmark's JSON document into its report: markdown tables, the JSON file and two plots.

Files written to the results folder:
    * ``results.json``: every number of every row, with the configuration, seeds and data description.
    * ``results.md``: the headline table (mean ± std over seeds of the mean over pairs), then one table per pair
      and data level (mean ± std over seeds).
    * ``accuracy_vs_locality.png``: ``acc_all`` against ``locality``, one point a method (headline numbers).
    * ``cost.png``: bars of extra parameters and latency per method, relative to the source and the target.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["write", "markdown", "headline", "aggregate", "frontier_plot", "COLUMNS"]

COLUMNS: tuple[tuple[str, str], ...] = (
    ("acc_old", "acc old"),
    ("acc_new", "acc new"),
    ("acc_all", "acc all"),
    ("locality", "locality"),
    ("target_params_changed", "target params changed"),
    ("detach_max_abs_diff", "detach max abs diff"),
    ("extra_params", "extra params (x S)"),
    ("patch_bytes", "patch bytes (x S)"),
    ("clone_seconds", "clone s"),
    ("latency_vs_target", "latency x T"),
    ("latency_vs_target_plus_source", "latency x (T+S)"),
)
"""Table columns: (row key, header)."""

_NUMERIC = (
    "acc_old",
    "acc_new",
    "acc_all",
    "locality",
    "target_params_changed",
    "target_buffers_changed",
    "detach_max_abs_diff",
    "extra_params",
    "extra_params_ratio",
    "patch_bytes",
    "patch_bytes_ratio",
    "clone_seconds",
    "latency_vs_target",
    "latency_vs_target_plus_source",
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(
    rows: Iterable[dict[str, Any]], by: tuple[str, ...]
) -> dict[tuple, dict[str, tuple[float, float] | None]]:
    """Mean and std over seeds of every numeric column, per ``by`` key (a value is ``None`` when it is n/a).

    When ``by`` leaves out ``pair`` (the headline), each seed's value is first averaged over the pairs, so the
    std is the spread over seeds of the all-pairs mean.
    """
    per_seed: dict[tuple, dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    missing: dict[tuple, set[str]] = defaultdict(set)
    for row in rows:
        key = tuple(row[k] for k in by)
        for column in _NUMERIC:
            if row.get(column) is None:
                missing[key].add(column)
            else:
                per_seed[key][row["seed"]][column].append(float(row[column]))
    result: dict[tuple, dict[str, tuple[float, float] | None]] = {}
    for key, seeds in per_seed.items():
        result[key] = {
            column: None
            if column in missing[key]
            else _mean_std([statistics.fmean(seeds[s][column]) for s in sorted(seeds)])
            for column in _NUMERIC
        }
    for key in missing.keys() - result.keys():
        result[key] = {column: None for column in _NUMERIC}
    return result


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _cell(column: str, stats: dict[str, tuple[float, float] | None]) -> str:
    value = stats[column]
    if value is None:
        return "n/a"
    mean, std = value
    if column.startswith(("acc", "locality")):
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    if column in ("extra_params", "patch_bytes"):
        ratio = stats[f"{column}_ratio"]
        return f"{_si(mean)}{'B' if column == 'patch_bytes' else ''} ({ratio[0]:.3f}x)" if ratio else _si(mean)
    if column == "target_params_changed":
        return _si(mean)
    if column == "detach_max_abs_diff":
        return "inf" if math.isinf(mean) else ("0" if mean == 0 else f"{mean:.2g}")
    return f"{mean:.2f}"


def _table(stats_by_method: dict[str, dict[str, tuple[float, float] | None]], methods: list[str]) -> str:
    header = "| method | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    lines = [header, rule]
    for method in methods:
        if method in stats_by_method:
            cells = [_cell(column, stats_by_method[method]) for column, _ in COLUMNS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(document: dict[str, Any]) -> tuple[Any, dict[str, dict[str, tuple[float, float] | None]]]:
    """The headline level (0.3 if run, else the first) and its per-method stats averaged over pairs."""
    levels = document["config"]["levels"]
    level = 0.3 if 0.3 in levels else levels[0]
    stats = aggregate((r for r in document["rows"] if r["level"] == level), ("method",))
    return level, {key[0]: value for key, value in stats.items()}


def _level_name(level: float | int) -> str:
    return f"{100 * level:g}% of K's train images" if isinstance(level, float) else f"{level} images per class of K"


def markdown(document: dict[str, Any]) -> str:
    """The report as markdown: data description, headline table, then per pair and level."""
    config, data = document["config"], document["data"]
    methods = config["methods"]
    level, head = headline(document)
    parts = [
        f"# Cloning benchmark: {data['dataset']}",
        "",
        f"A = {data['target_classes']}, B = {data['source_classes']}, K = {data['clone_classes']}; "
        f"images {config['image_size']} px from {data['source']}; seeds {config['seeds']}; "
        f"{data['test_images']} test images of A and K. {data['same_data'][0].upper()}{data['same_data'][1:]}.",
        f"Trained baselines: {config['hyper']['steps']} AdamW steps of {config['hyper']['batch_size']} images on "
        f"clone data + replay set{', class-balanced batches' if config['hyper']['balanced'] else ''}. "
        f"Wall time {document['wall_seconds'] / 60:.1f} min, {document['environment']['threads']} thread(s).",
        *_partial_note(document),
        "",
        f"## Headline: {_level_name(level)}, mean over pairs {config['pairs']} (± std over seeds)",
        "",
        _table(head, methods),
    ]
    per_pair = aggregate(document["rows"], ("pair", "level", "method"))
    for pair in config["pairs"]:
        for lvl in config["levels"]:
            stats = {key[2]: value for key, value in per_pair.items() if key[0] == pair and key[1] == lvl}
            if stats:
                parts += ["", f"### {pair}, {_level_name(lvl)}", "", _table(stats, methods)]
    models = document["models"]
    if models:
        parts += [
            "",
            "### Trained models",
            "",
            "| pair | seed | target acc on A | source acc on K (among K) |",
            "|---|---|---|---|",
        ]
        parts += [
            f"| {m['pair']} | {m['seed']} | {100 * m['target_acc_on_A']:.1f} | "
            f"{100 * m['source_acc_on_K_among_K']:.1f} |"
            for m in models
        ]
    return "\n".join(parts) + "\n"


def _partial_note(document: dict[str, Any]) -> list[str]:
    config = document["config"]
    expected = len(config["pairs"]) * len(config["seeds"]) * len(config["levels"]) * len(config["methods"])
    done = len(document["rows"])
    return [] if done >= expected else [f"**Partial run: {done} of {expected} rows so far.**"]


def _plots(document: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level, head = headline(document)
    methods = [m for m in document["config"]["methods"] if m in head]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in methods:
        (x, xs), (y, ys) = head[method]["locality"], head[method]["acc_all"]
        ax.errorbar(
            100 * x,
            100 * y,
            xerr=100 * xs,
            yerr=100 * ys,
            fmt="o",
            capsize=3,
            color="tab:red" if method.startswith("pnc") else "tab:blue",
        )
        ax.annotate(method, (100 * x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("locality (% of A's test predictions unchanged)")
    ax.set_ylabel("acc all (% on A ∪ K)")
    ax.set_title(f"{document['data']['dataset']}: {_level_name(level)}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_locality.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, column, title in (
        (axes[0], "extra_params_ratio", "extra parameters / source parameters"),
        (axes[1], "latency_vs_target", "inference latency / target alone"),
    ):
        values = [head[m][column][0] if head[m][column] else 0.0 for m in methods]
        ax.bar(range(len(methods)), values, color=["tab:red" if m.startswith("pnc") else "tab:blue" for m in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)
    plt.close(fig)


def write(document: dict[str, Any], out: Path) -> None:
    """Write ``results.json``, ``results.md`` and the two plots into ``out`` (created if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str))
    (out / "results.md").write_text(markdown(document))
    _plots(document, out)


def frontier_plot(document: dict[str, Any], path: Path) -> None:
    """PNC's ``acc_all``-vs-locality curve over gate budgets (mean over cells) beside the other methods' points and
    the oracle's ``acc_all`` (a document of :mod:`benchmarks.frontier`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = document["rows"]
    cells = {(r["pair"], r["seed"]) for r in rows if r["method"] == "oracle"}
    rows = [r for r in rows if (r["pair"], r["seed"]) in cells]
    if not rows:
        return

    def mean(chosen: list[dict[str, Any]], key: str) -> float:
        return 100 * sum(r[key] for r in chosen) / len(chosen)

    budgets = sorted({r["budget"] for r in rows if r["method"] == "pnc"})
    curve = [[r for r in rows if r["method"] == "pnc" and r["budget"] == b] for b in budgets]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(
        [mean(c, "locality") for c in curve],
        [mean(c, "acc_all") for c in curve],
        "o-",
        color="tab:red",
        label="pnc (gate budget sweep)",
    )
    for budget, chosen in zip(budgets, curve):
        ax.annotate(
            f"{budget:g}",
            (mean(chosen, "locality"), mean(chosen, "acc_all")),
            textcoords="offset points",
            xytext=(3, -10),
            fontsize=7,
            color="tab:red",
        )
    for method, style in (("pnc_learned_gate", "s"), ("finetune", "^"), ("lwf", "v"), ("ewc", "D")):
        chosen = [r for r in rows if r["method"] == method]
        if chosen:
            ax.plot(
                mean(chosen, "locality"),
                mean(chosen, "acc_all"),
                style,
                color="tab:orange" if method.startswith("pnc") else "tab:blue",
            )
            ax.annotate(
                method,
                (mean(chosen, "locality"), mean(chosen, "acc_all")),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    oracle = [r for r in rows if r["method"] == "oracle"]
    ax.axhline(
        mean(oracle, "acc_all"), color="tab:green", linestyle="--", label="oracle (joint training on A ∪ K, all data)"
    )
    ax.set_xlabel("locality (% of A's test predictions unchanged)")
    ax.set_ylabel("acc all (% on A ∪ K)")
    ax.set_title(f"Fashion-MNIST frontier, {len(cells)} cells")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
