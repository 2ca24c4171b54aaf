"""The gate across architecture pairs: ``python -m benchmarks.pair_matrix``.

For every (source -> target) pair of :data:`MATRIX_PAIRS` (timm CNNs, ViTs, hybrids and MLPs, transformers image
and text models; none of them in the tests' zoo) it trains a target on classes A = 0-4 and a source on B = 5-9
(cached like the main benchmark's models), clones K = 5, 6, 7 with all of K's train images and a replay set of 20
images per class of A, and measures on the test split:

* ``source_acc_k``: the source's accuracy on K among K (what the branch starts from);
* ``branch_acc_k``: the branch alone (adapter + pruned source tail) among K, on K's test inputs;
* ``pass_rate_k``: share of K's test inputs that the patched target answers with a cloned class;
* ``acc_k``: share of K's test inputs that the patched target answers right (the gate's cost shows as
  ``acc_k / branch_acc_k``);
* ``locality``: share of A's test inputs whose answer the patch leaves unchanged, and ``false_positive_rate``
  (share of them sent to a cloned class; with the target's logits untouched the two add up to 1);
* ``gate_share``: the gate's share of the patched forward's wall time;
* the same answers with each gate kind alone (``--compare``, default ``"novelty"`` and ``"learned"``; ``clone``
  keeps the better of the two by its out-of-fold pass rate) fitted on the same patch and the same evidence.

Images are scikit-learn's digits at 32 px; text models get generated token sentences (:func:`token_sentences`).
``--dump DIR`` also saves each pair's gate evidence (clone data, replay set with its shifted copies, test split)
for offline study of gates::

    python -m benchmarks.pair_matrix --out results/pair_matrix
    python -m benchmarks.pair_matrix --pairs "resnet18->mobilenetv3" --dump results/evidence
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pnc_surgery.clone import CloneConfig, clone
from pnc_surgery.data import collect, with_shifted_copies
from pnc_surgery.evidence import GateInputs
from pnc_surgery.gate import Gate
from pnc_surgery.patch import Patch

from .datasets import ClassSplit, ImageDataset, class_split, load_digits, select_classes
from .models import MATRIX_ARCHS, trained_model
from .training import predict_logits, torch_threads

__all__ = [
    "CLONE_CONFIG",
    "MATRIX_PAIRS",
    "fit_evidence",
    "gate_inputs",
    "gate_outcome",
    "main",
    "markdown",
    "pair_row",
    "refit_gate",
    "save_evidence",
    "token_sentences",
]

logger = logging.getLogger("benchmarks.pair_matrix")

MATRIX_PAIRS: dict[str, tuple[str, str]] = {
    "resnet18->mobilenetv3": ("resnet18", "mobilenetv3"),
    "mobilenetv3->convnext_atto": ("mobilenetv3", "convnext_atto"),
    "convnext_atto->resnet18": ("convnext_atto", "resnet18"),
    "deit_tiny->resnet18": ("deit_tiny", "resnet18"),
    "resnet18->deit_tiny": ("resnet18", "deit_tiny"),
    "mixer->mobilenetv3": ("mixer", "mobilenetv3"),
    "convnext_atto->mixer": ("convnext_atto", "mixer"),
    "mobilevit->deit_tiny": ("mobilevit", "deit_tiny"),
    "levit->mobilevit": ("levit", "mobilevit"),
    "deit_tiny->levit": ("deit_tiny", "levit"),
    "hf_vit_small->resnet18": ("hf_vit_small", "resnet18"),
    "mobilenetv3->hf_vit_small": ("mobilenetv3", "hf_vit_small"),
    "bert->distilbert": ("bert", "distilbert"),
    "distilbert->bert": ("distilbert", "bert"),
}
"""``"source->target"``: CNN to CNN across families, ViT and CNN both ways, MLP-Mixer both ways, hybrids
(MobileViT, LeViT), transformers ViT and timm both ways, and transformers text models both ways."""

CLONE_CONFIG: dict[str, Any] = {}
"""``CloneConfig`` settings of every pair: the library's defaults, as in the main benchmark."""

IMAGE_SIZE = 32
MODEL_STEPS = 150


def token_sentences(
    num_classes: int = 10, per_class: int = 180, length: int = 24, vocab: int = 256, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """A generated 10-class text task: each class owns 8 keyword tokens; a sentence holds 3 of its class's keywords
    and 1 of another class's among random filler tokens. Two thirds of every class go to the train split.

    Returns:
        ``(train, test)`` with token ids of shape ``(N, length)`` as the "images".
    """
    gen = torch.Generator().manual_seed(seed)
    filler = 8 * num_classes
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    ids = torch.randint(filler, vocab, (len(labels), length), generator=gen)
    for row, label in enumerate(labels.tolist()):
        other = (label + int(torch.randint(1, num_classes, (), generator=gen))) % num_classes
        words = torch.cat(
            [8 * label + torch.randint(8, (3,), generator=gen), 8 * other + torch.randint(8, (1,), generator=gen)]
        )
        ids[row, torch.randperm(length, generator=gen)[:4]] = words
    order = torch.randperm(len(labels), generator=gen)
    ids, labels = ids[order], labels[order]
    train = torch.zeros(len(labels), dtype=torch.bool)
    for value in range(num_classes):
        index = (labels == value).nonzero().flatten()
        train[index[: 2 * len(index) // 3]] = True
    names = [str(i) for i in range(num_classes)]
    return (
        ImageDataset(ids[train], labels[train], "generated", names),
        ImageDataset(ids[~train], labels[~train], "generated", names),
    )


@torch.no_grad()
def gate_inputs(patch: Patch, target: nn.Module, data: Any, batch_size: int = 256) -> tuple[GateInputs, float]:
    """What the gate of ``patch`` sees on ``data`` with the patch attached to ``target``, and the gate's share of
    the patched forward's wall time."""
    captured: list[GateInputs] = []
    clock = {"gate": 0.0, "started": 0.0}

    def before(_module: nn.Module, _args: tuple) -> None:
        clock["started"] = time.perf_counter()

    def after(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        clock["gate"] += time.perf_counter() - clock["started"]
        captured.append(GateInputs(*(value.detach().float() for value in args)))

    hooks = [patch.gate.register_forward_pre_hook(before), patch.gate.register_forward_hook(after)]
    try:
        with patch.attached(target):
            start = time.perf_counter()
            predict_logits(target, data, batch_size=batch_size)
            seconds = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    return GateInputs.cat(captured), clock["gate"] / seconds


@torch.no_grad()
def gate_outcome(gate: Gate, seen: GateInputs, labels: torch.Tensor, num_old: int) -> dict[str, float]:
    """The patched target's answers on inputs whose gate inputs are ``seen`` (labels in the A then K space)."""
    predictions = torch.cat([seen.target_logits, gate(*seen).float()], dim=1).argmax(1)
    is_k = labels >= num_old
    own = seen.target_logits.argmax(1)
    return {
        "pass_rate_k": (predictions[is_k] >= num_old).float().mean().item(),
        "acc_k": (predictions[is_k] == labels[is_k]).float().mean().item(),
        "acc_all": (predictions == labels).float().mean().item(),
        "locality": (predictions[~is_k] == own[~is_k]).float().mean().item(),
        "false_positive_rate": (predictions[~is_k] >= num_old).float().mean().item(),
    }


def _split(pair: str, seed: int) -> ClassSplit:
    source_arch = MATRIX_PAIRS[pair][0]
    text = MATRIX_ARCHS[source_arch].family == "transformers-text"
    train, test = token_sentences(seed=0) if text else load_digits(image_size=IMAGE_SIZE)
    return class_split(train, test, clone_level=1.0, replay_per_class=20, seed=seed)


def pair_row(
    pair: str,
    seed: int,
    cache: Path,
    clone_config: dict[str, Any],
    compare: Sequence[str] = ("novelty", "learned"),
    dump: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train (or load) the pair's models, clone, and measure the gate (see the module docstring).

    Args:
        compare: gate kinds to fit alone on the same patch and the same evidence, reported under ``compare``.
        dump: folder for the pair's gate inputs (clone data, replay set with shifted copies, test split).
    """
    source_arch, target_arch = MATRIX_PAIRS[pair]
    split = _split(pair, seed)
    dataset_name = "tokens" if split.test.source == "generated" else "digits"
    common = {
        "dataset_name": dataset_name,
        "image_size": IMAGE_SIZE,
        "steps": MODEL_STEPS,
        "seed": seed,
        "cache_dir": cache,
        "progress": progress,
    }
    source, _ = trained_model(source_arch, "source", split.source_train, split.source_classes, **common)
    target, _ = trained_model(target_arch, "target", split.target_train, split.target_classes, **common)
    num_old, clone_ids = split.num_old, list(split.clone_source_ids)
    test_k = select_classes(split.test, range(num_old, num_old + len(clone_ids)))
    source_k = predict_logits(source, test_k)[:, clone_ids].argmax(1)

    start = time.perf_counter()
    patch = clone(
        source,
        target,
        split.clone,
        classes=clone_ids,
        replay=split.replay,
        config=CloneConfig(**clone_config),
        seed=seed,
        progress=progress,
    )
    clone_seconds = time.perf_counter() - start
    seen, gate_share = gate_inputs(patch, target, split.test)
    labels, is_k = split.test.labels, split.test.labels >= num_old
    row = {
        "pair": pair,
        "seed": seed,
        "cut": patch.metrics.get("cut"),
        "insertion": patch.metrics.get("insertion"),
        "gate": patch.gate.kind,
        "source_acc_k": (source_k == test_k.labels - num_old).float().mean().item(),
        "target_acc_a": (seen.target_logits[~is_k].argmax(1) == labels[~is_k]).float().mean().item(),
        "branch_acc_k": (seen.branch_logits[is_k].argmax(1) == labels[is_k] - num_old).float().mean().item(),
        **gate_outcome(patch.gate, seen, labels, num_old),
        "gate_share": gate_share,
        "clone_seconds": clone_seconds,
        "gate_fit": {k: v for k, v in patch.metrics.items() if k.startswith("gate")},
        "compare": {},
    }
    if compare or dump is not None:
        evidence = fit_evidence(patch, target, split)
        budget = CloneConfig(**clone_config).max_false_positive_rate
        for kind in compare:
            gate, fit = refit_gate(kind, evidence, budget, seed)
            row["compare"][kind] = {**gate_outcome(gate, seen, labels, num_old), "gate_fit": fit}
        if dump is not None:
            save_evidence(dump, pair, seed, evidence, seen, labels, num_old, row)
    return row


def fit_evidence(patch: Patch, target: nn.Module, split: ClassSplit) -> dict[str, Any]:
    """What ``clone`` fits its gate on: the gate inputs of the clone data (with their classes) and of the replay
    set with its shifted copies (with their classes and the replay image each row comes from)."""
    replay, sources = with_shifted_copies(collect(split.replay, "replay"))
    positives, _ = gate_inputs(patch, target, split.clone)
    negatives, _ = gate_inputs(patch, target, split.replay.with_tensors(replay.inputs, replay.labels))
    groups = torch.as_tensor([split.clone_source_ids.index(int(c)) for c in split.clone.labels])
    return {
        "positives": positives,
        "positive_groups": groups,
        "negatives": negatives,
        "negative_groups": replay.labels,
        "negative_sources": sources,
    }


def save_evidence(
    folder: Path,
    pair: str,
    seed: int,
    evidence: dict[str, Any],
    seen: GateInputs,
    labels: torch.Tensor,
    num_old: int,
    row: dict[str, Any],
) -> Path:
    """Save a cell's :func:`fit_evidence`, its test split's gate inputs and labels, and ``row`` (what
    ``benchmarks.gate_ceiling`` reads) as ``folder / "<source>__<target>_seed<seed>.pt"``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pair.replace('->', '__')}_seed{seed}.pt"
    torch.save(
        {
            "evidence": {k: v._asdict() if isinstance(v, GateInputs) else v for k, v in evidence.items()},
            "test": seen._asdict(),
            "test_labels": labels,
            "num_old": num_old,
            "row": row,
        },
        path,
    )
    return path


def refit_gate(
    kind: str, evidence: dict[str, Any], budget: float, seed: int, also_try: Sequence[str] = ()
) -> tuple[Gate, dict]:
    """A gate of ``kind`` (or of one of ``also_try``, see :meth:`Gate.fit`) fitted on :func:`fit_evidence` with
    false-positive budget ``budget``, and its fit metrics."""
    positives: GateInputs = evidence["positives"]
    gate = Gate.unfitted(
        kind, positives.target_logits.shape[1], positives.branch_logits.shape[1], positives.pre_logits.shape[1]
    )
    fit = gate.fit(
        positives,
        evidence["positive_groups"],
        evidence["negatives"],
        evidence["negative_groups"],
        negative_sources=evidence["negative_sources"],
        max_false_positive_rate=budget,
        seed=seed,
        also_try=also_try,
    )
    return gate, fit


TABLE_COLUMNS = (
    "source_acc_k",
    "branch_acc_k",
    "pass_rate_k",
    "acc_k",
    "acc_all",
    "locality",
    "false_positive_rate",
    "gate_share",
)


def markdown(rows: Sequence[dict[str, Any]], budget: float) -> str:
    """The pair-matrix table (percentages), with whether each pair meets the gate's targets: ``acc_k`` at least
    0.9x ``branch_acc_k``, locality at least 99%, false positives at most 1.5x the budget. The compared gates'
    ``acc_k`` / locality follow."""
    compared = sorted({kind for row in rows for kind in row["compare"]})
    lines = [
        "| pair | "
        + " | ".join(TABLE_COLUMNS)
        + " | acc_k / branch | met | "
        + "".join(f"{kind} gate: acc_k / locality | " for kind in compared),
        "|---|" + "---|" * (len(TABLE_COLUMNS) + 2 + len(compared)),
    ]
    for row in rows:
        ratio = row["acc_k"] / max(row["branch_acc_k"], 1e-9)
        met = ratio >= 0.9 and row["locality"] >= 0.99 and row["false_positive_rate"] <= 1.5 * budget
        cells = [f"{100 * row[c]:.1f}" for c in TABLE_COLUMNS]
        others = "".join(
            f"{100 * row['compare'][k]['acc_k']:.1f} / {100 * row['compare'][k]['locality']:.1f} | "
            if k in row["compare"]
            else "| "
            for k in compared
        )
        lines.append(
            f"| {row['pair']} | " + " | ".join(cells) + f" | {ratio:.2f} | {'yes' if met else 'NO'} | " + others
        )
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pair_matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=sorted(MATRIX_PAIRS), default=list(MATRIX_PAIRS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clone-config", help="JSON of CloneConfig settings (default: CLONE_CONFIG)")
    parser.add_argument("--out", type=Path, default=Path("results/pair_matrix"))
    parser.add_argument("--cache", type=Path, default=Path("results/cache"))
    parser.add_argument("--dump", type=Path, default=None, help="also save every pair's gate evidence here")
    parser.add_argument(
        "--compare", nargs="*", default=["novelty", "learned"], help="other gate kinds fitted on the same patches"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", nargs="+", type=Path, help="only print the table of these pair_matrix.json files")
    args = parser.parse_args(argv)
    if args.report:
        documents = [json.loads(path.read_text()) for path in args.report]
        rows = list({row["pair"]: row for document in documents for row in document["rows"]}.values())
        rows.sort(key=lambda row: list(MATRIX_PAIRS).index(row["pair"]))
        budget = CloneConfig(**documents[0]["clone_config"]).max_false_positive_rate
        print(markdown(rows, budget))
        return rows
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    clone_config = {**CLONE_CONFIG, **json.loads(args.clone_config or "{}")}
    budget = CloneConfig(**clone_config).max_false_positive_rate
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch_threads(args.threads):
        for pair in args.pairs:
            logger.info("pair %s", pair)
            rows.append(pair_row(pair, args.seed, args.cache, clone_config, args.compare, args.dump))
            document = {"clone_config": clone_config, "rows": rows, "wall_seconds": time.perf_counter() - started}
            (args.out / "pair_matrix.json").write_text(json.dumps(document, indent=1))
            (args.out / "pair_matrix.md").write_text(markdown(rows, budget) + "\n")
    print(markdown(rows, budget))
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
