"""``clone(source, target, data)``: Partial Network Cloning, end to end, as stages over one :class:`CloneRun`.

0. Check the inputs (models, data, classes) before any training (:mod:`pnc_surgery.data`).
1. ``prepare``: find the source's cut points and the target's insertion points; extract features at the candidates
   once; start an adapter for every compatible pair.
2. ``search``: rank (cut, insertion) pairs jointly with successive halving (:mod:`pnc_surgery.search`).
3. ``localize``: prune the winning branch to what the cloned classes need (:mod:`pnc_surgery.localize`).
4. ``train``: adapter and branch, by feature matching to the source and distillation of its cloned-class logits.
5. ``fit_gate``: the gate that keeps the target's answers (:mod:`pnc_surgery.gate`).
6. ``package``: everything as a :class:`Patch` with the run's metrics.

Each stage reads the run state, sets what it produces on it, and returns its metrics.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, feature_spec
from .backends import Backend, backend_for
from .backends.base import ModelInputs, image_size
from .branch import SourceTail
from .data import (
    Examples, batches, check_target_input, collect, select_classes, source_view, to_view, with_shifted_copies,
)
from .errors import InvalidInputError, UnsupportedModelError
from .evidence import GateInputs, patch_gate_inputs
from .gate import AUTO_ALTERNATIVES, GATE_KINDS
from .localize import branch_parameters, local_accuracy, localize
from .patch import Patch
from .points import Point, find_points
from .search import Candidate, FitData, evaluate, spread_points, successive_halving, train_candidate
from .tracing import classifier_names, eval_mode, trace_model

__all__ = ["CloneConfig", "CloneRun", "clone"]


@dataclass
class CloneConfig:
    """How :func:`clone` spends its budget. Defaults suit tens to hundreds of images per class on a CPU."""

    search_positions: bool = True
    """Search (cut, insertion) pairs jointly; ``False`` cuts at the source's last stage and inserts at the target's (ablation)."""
    max_cuts: int = 3
    """Source cut points considered (evenly spaced over the source's depth, stage ends first)."""
    max_insertions: int = 3
    """Target insertion points considered (evenly spaced over the target's depth, stage ends first)."""
    cut: str | None = None
    """Force this source cut point (a module name from ``find_points``)."""
    insertion: str | None = None
    """Force this target insertion point."""
    search_steps: int = 30
    """Adapter training steps per pair in the first search round (doubled each round for the survivors)."""
    localize: bool = True
    """Prune the branch to what the cloned classes need; ``False`` keeps the full source tail (ablation)."""
    keep_ratio: float | None = None
    """Fraction of prunable units to keep; ``None`` picks the smallest that keeps local accuracy within ``accuracy_tolerance``."""
    keep_ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7)
    """Ratios tried when ``keep_ratio`` is ``None``."""
    accuracy_tolerance: float = 0.01
    """Local accuracy (on the clone data) that pruning may cost."""
    adapter_hidden: int = 64
    """Width of the adapter's residual bottleneck (0: a single 1x1 projection)."""
    train_steps: int = 400
    """Final training steps of the adapter (and branch)."""
    finetune_branch: bool = True
    """Also fine-tune the (pruned) branch in the final training, by distillation from the source."""
    lr: float = 3e-3
    """Learning rate of the adapter."""
    branch_lr: float = 1e-3
    """Learning rate of the branch when ``finetune_branch`` (cosine-decayed over ``train_steps``)."""
    batch_size: int = 64
    """Mini-batch size for every training loop."""
    temperature: float = 2.0
    """Distillation temperature."""
    feature_weight: float = 1.0
    """Weight of feature matching (adapter output vs the source's own feature at the cut)."""
    gate: str = "auto"
    """``"auto"``: with replay data, the ``"novelty"`` and ``"learned"`` gates both, keeping the one that passes
    more held-out clone inputs at the budget; ``"energy"`` without. Or one of ``pnc_surgery.gate.GATE_KINDS``."""
    max_false_positive_rate: float = 0.01
    """Share of target-domain inputs the gate may send to a cloned class. The gate aims at half of it
    (``pnc_surgery.gate.CALIBRATION``), from the tail of its out-of-fold replay margins: a quantile estimated from
    a hundred replay images misses by up to a factor of two in single runs. Lower it for more locality, raise it
    for more new-class accuracy (the README's frontier shows the trade-off)."""
    shift_replay: bool = True
    """Also calibrate the gate on copies of the replay images shifted by 1/16 of their size: the target has usually
    trained on its replay images and is surer of them than of new inputs, so a gate calibrated on them alone lets
    more new target-domain inputs through than its budget."""
    heldout_fraction: float = 0.2
    """Share of the clone data kept out of training to score the search and report accuracy."""
    feature_batch_size: int = 128
    """Batch size for feature extraction."""
    feature_memory_gb: float = 2.0
    """The search keeps every candidate point's features for the whole clone set in memory; points whose features
    would take more than this (early, high-resolution points of large models) are left out of the search."""
    source_kwargs: dict[str, Any] = field(default_factory=dict)
    """timm ``create_model`` kwargs of the source when they cannot be inferred (see ``backends.timm.create_model``)."""

    def __post_init__(self) -> None:
        if self.gate not in ("auto", *GATE_KINDS):
            raise InvalidInputError(f"gate must be 'auto' or one of {GATE_KINDS}, got {self.gate!r}")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise InvalidInputError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not 0 < self.max_false_positive_rate < 1:
            raise InvalidInputError(f"max_false_positive_rate must be in (0, 1), got {self.max_false_positive_rate}")
        if not 0 < self.heldout_fraction < 1:
            raise InvalidInputError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.feature_memory_gb <= 0:
            raise InvalidInputError(f"feature_memory_gb must be positive, got {self.feature_memory_gb}")
        for name in ("max_cuts", "max_insertions", "batch_size", "train_steps", "search_steps"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be at least 1")


@torch.no_grad()
def _extract(
    model: nn.Module,
    names: Sequence[str],
    examples: Examples,
    batch_size: int,
    view: Any,
    desc: str,
    progress: bool,
    classifiers: Sequence[str] = (),
    backend: Backend | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Features at ``names``, logits and (with ``classifiers``) pre-logits for every example (eval mode, batched)."""
    backend = backend or backend_for(model)
    wanted = set(names)
    features: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    logits, pre_logits = [], []
    total = (len(examples) + batch_size - 1) // batch_size
    with eval_mode(model):
        for batch in tqdm(batches(examples, batch_size), total=total, desc=desc, disable=not progress, leave=False):
            inputs = backend.call_inputs(model, to_view(batch.inputs, *view) if view else batch.inputs)
            trace = trace_model(model, inputs, backend, keep=wanted.__contains__, classifiers=classifiers)
            for name in names:
                features[name].append(trace.calls[name].output)
            logits.append(trace.logits.float())
            if trace.pre_logits is not None:
                pre_logits.append(trace.pre_logits)
    return (
        {name: torch.cat(parts) for name, parts in features.items()},
        torch.cat(logits),
        torch.cat(pre_logits) if pre_logits else None,
    )


def _with_blocks_after(
    model: nn.Module, backend: Backend, points: list[Point], inputs: ModelInputs, min_share: float = 0.02
) -> list[Point]:
    """Points that leave source blocks in the branch: a cut after the last block would clone only head rows.

    A tail must hold at least ``min_share`` of the model's parameters besides the classifier.
    """
    with eval_mode(model):
        trace = trace_model(model, inputs, backend)
    head = set(classifier_names(trace, int(trace.logits.shape[-1]), after=-1))
    total = sum(p.numel() for p in model.parameters())
    leaves = [c for c in trace.calls.values() if not any(True for _ in c.module.children()) and c.name not in head]
    kept = []
    for point in points:
        cut_post = trace.calls[point.name].post
        after = sum(p.numel() for c in leaves if c.pre > cut_post for p in c.module.parameters(recurse=False))
        if after >= min_share * total:
            kept.append(point)
    if not kept:
        raise UnsupportedModelError(f"{type(model).__name__} has no cut point with source blocks after it")
    return kept


def _affordable(points: list[Point], examples: int, budget_bytes: float) -> list[Point]:
    """Points whose float32 features for ``examples`` inputs fit in ``budget_bytes`` (at least the last point)."""
    return [p for p in points if 4 * math.prod(p.shape) * examples <= budget_bytes] or points[-1:]


def _least_squares_rows(index: torch.Tensor, point: Point, generator: torch.Generator, max_rows: int = 2**18) -> torch.Tensor:
    """Examples for an adapter's least-squares start: at most ``max_rows`` feature positions in all."""
    positions = math.prod(point.shape[:-1]) if point.layout != "NCHW" else math.prod(point.shape[1:])
    count = min(len(index), max(16, max_rows // max(positions, 1)))
    return index[torch.randperm(len(index), generator=generator)[:count]]


def _last_stage(points: Sequence[Point]) -> Point:
    """The last point whose shape differs from the final one: where the last stage starts."""
    final = points[-1].shape
    for point in reversed(points):
        if point.shape != final:
            return point
    return points[len(points) // 2]


def _stratified_split(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    fit, held = [], []
    for value in labels.unique():
        index = (labels == value).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        count = int(round(fraction * len(index))) if len(index) > 1 else 0
        count = min(max(count, 1 if len(index) > 2 else 0), len(index) - 1)
        held.append(index[:count])
        fit.append(index[count:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


@dataclass
class CloneRun:
    """The state one :func:`clone` call passes from stage to stage.

    The checked inputs come first; each stage fills in what it produces (features, candidates, the winner).
    """

    source: nn.Module
    target: nn.Module
    source_backend: Backend
    target_backend: Backend
    examples: Examples
    """Clone data of the cloned classes only, in the target's input format."""
    labels: torch.Tensor
    """Label of each example as an index into ``classes``."""
    classes: list[int]
    replay: Examples | None
    view: tuple[int, tuple[int, int]] | None
    """How images are resized for the source (``None``: as they are)."""
    source_sample: ModelInputs
    target_sample: ModelInputs
    config: CloneConfig
    generator: torch.Generator
    progress: bool
    target_features: dict[str, torch.Tensor] = field(default_factory=dict)
    source_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: torch.Tensor | None = None
    """The source's logits of the cloned classes on every example."""
    context: dict[str, torch.Tensor] = field(default_factory=dict)
    """Keyword inputs the branch needs besides the feature (``attention_mask``)."""
    fit_index: torch.Tensor | None = None
    held_index: torch.Tensor | None = None
    candidates: list[Candidate] = field(default_factory=list)
    winner: Candidate | None = None
    ranking: list[dict] = field(default_factory=list)

    def rows(self, candidate: Candidate, index: torch.Tensor) -> FitData:
        """Training rows of ``candidate`` (its insertion's and cut's features) for the examples in ``index``."""
        assert self.teacher is not None, "prepare() first"
        return FitData(
            self.target_features[candidate.insertion.name][index],
            self.source_features[candidate.cut.name][index],
            self.teacher[index],
            self.labels[index],
            {k: v[index] for k, v in self.context.items()},
        )

    def train_kwargs(self) -> dict[str, Any]:
        """The loss and optimiser settings every adapter training of the run shares."""
        config = self.config
        return dict(lr=config.lr, batch_size=config.batch_size, temperature=config.temperature, feature_weight=config.feature_weight)


def clone(
    source: nn.Module,
    target: nn.Module,
    data: Any,
    *,
    classes: Sequence[int] | None = None,
    replay: Any = None,
    config: CloneConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Patch:
    """Clone classes of ``source`` into ``target`` as a :class:`Patch` (neither model is modified).

    Args:
        source: classifier that knows the classes to clone (timm or transformers, to save the patch).
        target: classifier that gains them.
        data: labelled examples of the classes to clone (``Dataset``, ``DataLoader`` or iterable of
            ``(x, y)``; ``y`` are source class ids). Images are in the target's input format; they are
            resized for the source when it expects another size.
        classes: source class ids to clone, in output order (default: the classes present in ``data``).
        replay: optional target-domain inputs (with or without labels) that help the gate protect the
            target's own answers.
        config: budgets and ablations (:class:`CloneConfig`).
        seed: makes the whole run reproducible.
        progress: show progress bars.

    Returns:
        The patch; ``patch.attach(target)`` adds the cloned classes after the target's own.
    """
    config = config or CloneConfig()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        run = _checked_run(source, target, data, classes, replay, config, torch.Generator().manual_seed(seed), progress)
        metrics: dict[str, Any] = {"clone_examples": len(run.examples), "cloned_classes": len(run.classes)}
        for stage in (prepare, search, localize_branch, train):
            metrics.update(stage(run))
        patch = _build(run)
        metrics.update(fit_gate(run, patch))
    metrics["clone_seconds"] = round(time.perf_counter() - started, 2)
    metrics["seed"] = seed
    return package(run, patch, metrics)


def _checked_run(
    source: nn.Module,
    target: nn.Module,
    data: Any,
    classes: Sequence[int] | None,
    replay: Any,
    config: CloneConfig,
    generator: torch.Generator,
    progress: bool,
) -> CloneRun:
    """Check models, data, classes and replay against each other; the run state every stage starts from."""
    for role, model in (("source", source), ("target", target)):
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"{role} must be a torch.nn.Module classifier, got {type(model).__name__}")
    source_backend, target_backend = backend_for(source), backend_for(target)
    examples = collect(data, "data")
    sample = examples.select(torch.arange(min(2, len(examples)))).inputs
    check_target_input(target, target_backend, sample)
    view = source_view(source, source_backend, sample)
    source_sample = source_backend.call_inputs(source, to_view(sample, *view) if view else sample)
    assert examples.labels is not None
    chosen = select_classes(examples.labels, classes, _num_classes(source, source_backend, source_sample))
    examples = examples.select(torch.isin(examples.labels, torch.tensor(chosen)).nonzero().flatten())
    assert examples.labels is not None
    local_labels = torch.tensor([chosen.index(int(y)) for y in examples.labels])
    replay_examples = collect(replay, "replay", labelled=False) if replay is not None else None
    return CloneRun(
        source, target, source_backend, target_backend, examples, local_labels, chosen, replay_examples, view,
        source_sample, target_backend.call_inputs(target, sample), config, generator, progress,
    )


def _num_classes(model: nn.Module, backend: Backend, inputs: ModelInputs) -> int:
    count = backend.num_classes(model)
    if count is None:
        with eval_mode(model):
            count = int(trace_model(model, inputs, backend).logits.shape[-1])
    return count


def _pairs(run: CloneRun) -> list[tuple[Point, Point]]:
    """The (cut, insertion) pairs to search: the config's forced points, or both models' spread candidates."""
    config, source_size, target_size = run.config, image_size(run.source_sample), image_size(run.target_sample)
    source_points = _with_blocks_after(
        run.source, run.source_backend, find_points(run.source, run.source_sample), run.source_sample
    )
    target_points = find_points(run.target, run.target_sample)
    budget = config.feature_memory_gb * 2**30
    searched_cuts = spread_points(_affordable(source_points, len(run.examples), budget), config.max_cuts)
    searched_insertions = spread_points(_affordable(target_points, len(run.examples), budget), config.max_insertions)
    if config.cut or config.insertion:
        cuts = [_named(source_points, config.cut, "source")] if config.cut else searched_cuts
        insertions = [_named(target_points, config.insertion, "target")] if config.insertion else searched_insertions
    elif config.search_positions:
        cuts, insertions = searched_cuts, searched_insertions
    else:
        cuts, insertions = [_last_stage(source_points)], [_last_stage(target_points)]
    pairs = [
        (c, p) for c in cuts for p in insertions
        if (feature_spec(c, source_size).grid is None) == (feature_spec(p, target_size).grid is None)
    ]
    if not pairs:
        raise UnsupportedModelError("no (cut, insertion) pair is compatible: one model works on images and the other on text")
    return pairs


def prepare(run: CloneRun) -> dict[str, Any]:
    """Features at every candidate point (once), the held-out split, and an adapter started by least squares
    for every compatible (cut, insertion) pair."""
    config = run.config
    pairs = _pairs(run)
    run.target_features, _, _ = _extract(
        run.target, sorted({p.name for _, p in pairs}), run.examples, config.feature_batch_size, None,
        "pnc: target features", run.progress, backend=run.target_backend,
    )
    run.source_features, source_logits, _ = _extract(
        run.source, sorted({c.name for c, _ in pairs}), run.examples, config.feature_batch_size, run.view,
        "pnc: source features", run.progress, backend=run.source_backend,
    )
    run.teacher = source_logits[:, run.classes]
    inputs = run.examples.inputs
    run.context = {k: v for k, v in inputs.items() if k == "attention_mask"} if isinstance(inputs, dict) else {}
    run.fit_index, run.held_index = _stratified_split(run.labels, config.heldout_fraction, run.generator)
    if len(run.held_index) == 0:
        run.held_index = run.fit_index

    branches: dict[str, SourceTail] = {}
    for cut in {c.name: c for c, _ in pairs}.values():
        branch = SourceTail.from_model(run.source, cut, run.source_sample)
        branch.keep_classes(run.classes)
        for parameter in branch.parameters():
            parameter.requires_grad_(False)
        branches[cut.name] = branch
    source_size, target_size = image_size(run.source_sample), image_size(run.target_sample)
    run.candidates = [
        Candidate(c, p, branches[c.name], Adapter(feature_spec(p, target_size), feature_spec(c, source_size), config.adapter_hidden))
        for c, p in pairs
    ]
    for candidate in run.candidates:
        sample = _least_squares_rows(run.fit_index, candidate.insertion, run.generator)
        candidate.adapter.fit_least_squares(
            run.target_features[candidate.insertion.name][sample], run.source_features[candidate.cut.name][sample]
        )
    return {"source_local_accuracy": round(float((run.teacher.argmax(-1) == run.labels).float().mean()), 4)}


def search(run: CloneRun) -> dict[str, Any]:
    """The winning (cut, insertion) pair by successive halving, and the ranking of all pairs."""
    assert run.fit_index is not None and run.held_index is not None, "prepare() first"
    fit_index, held_index = run.fit_index, run.held_index
    if len(run.candidates) > 1:
        run.winner, run.ranking = successive_halving(
            run.candidates, lambda c: run.rows(c, fit_index), lambda c: run.rows(c, held_index),
            first_steps=run.config.search_steps, generator=run.generator, progress=run.progress, **run.train_kwargs(),
        )
    else:
        run.winner, run.ranking = run.candidates[0], [run.candidates[0].record()]
    return {"cut": run.winner.cut.name, "insertion": run.winner.insertion.name, "pairs_searched": len(run.candidates)}


def localize_branch(run: CloneRun) -> dict[str, Any]:
    """Prune the winner's branch in place to what the cloned classes need (:func:`pnc_surgery.localize.localize`)."""
    assert run.winner is not None, "search() first"
    config, branch = run.config, run.winner.branch
    full_params = branch_parameters(branch)
    cut_features = run.source_features[run.winner.cut.name]
    data = [
        (cut_features[b], run.labels[b], {k: v[b] for k, v in run.context.items()})
        for b in torch.arange(len(run.labels)).split(config.batch_size)
    ]
    metrics: dict[str, Any] = {"branch_local_accuracy": round(local_accuracy(branch, data), 4)}
    ratio = 1.0
    if config.localize:
        ratio, found = localize(
            branch, data, keep_ratio=config.keep_ratio, keep_ratios=config.keep_ratios,
            tolerance=config.accuracy_tolerance, progress=run.progress,
        )
        metrics.update(found)
    metrics.update(
        kept_ratio=round(branch_parameters(branch) / max(full_params, 1), 4),
        branch_parameters=branch_parameters(branch),
        unpruned_branch_parameters=full_params,
        prune_keep_ratio=ratio,
    )
    return metrics


def train(run: CloneRun) -> dict[str, Any]:
    """The final training of the winner's adapter (and, with ``finetune_branch``, its branch)."""
    assert run.winner is not None and run.fit_index is not None and run.held_index is not None, "search() first"
    config, winner = run.config, run.winner
    with tqdm(total=config.train_steps, desc="pnc: train adapter + branch", disable=not run.progress, leave=False) as bar:
        train_candidate(
            winner, run.rows(winner, run.fit_index), config.train_steps, generator=run.generator, progress=bar.update,
            branch_lr=config.branch_lr if config.finetune_branch else 0.0, **run.train_kwargs(),
        )
    accuracy, _ = evaluate(winner, run.rows(winner, run.held_index), config.temperature, config.feature_weight)
    return {"heldout_local_accuracy": round(accuracy, 4)}


def _build(run: CloneRun) -> Patch:
    """The winner as a patch with an unfitted gate of the configured kind."""
    assert run.winner is not None, "search() first"
    config, winner = run.config, run.winner
    kind = config.gate if config.gate != "auto" else ("novelty" if run.replay is not None else "energy")
    patch = Patch.compose(
        run.source, run.target, winner.cut, winner.insertion, winner.branch, winner.adapter, kind,
        target_input=run.target_sample, source_kwargs=config.source_kwargs or None,
    )
    return patch.eval()


def fit_gate(run: CloneRun, patch: Patch) -> dict[str, Any]:
    """Fit ``patch``'s gate on the clone data (positives) and the replay data (negatives, when given)."""
    config, target, replay = run.config, run.target, run.replay
    positives, _ = _evidence(patch, target, run.examples, config, run.progress)
    negatives = negative_groups = negative_sources = None
    if replay is not None:
        replay, negative_sources = with_shifted_copies(replay) if config.shift_replay else (replay, None)
        negatives, replay_logits = _evidence(patch, target, replay, config, run.progress)
        labels_given = replay.labels is not None and bool(((replay.labels >= 0) & (replay.labels < replay_logits.shape[1])).all())
        negative_groups = replay.labels if labels_given else replay_logits.argmax(-1)
    return patch.gate.fit(
        positives, run.labels, negatives, negative_groups, negative_sources=negative_sources,
        max_false_positive_rate=config.max_false_positive_rate, seed=int(torch.randint(2**31, (), generator=run.generator)),
        also_try=AUTO_ALTERNATIVES if config.gate == "auto" else (),
    )


def package(run: CloneRun, patch: Patch, metrics: dict[str, Any]) -> Patch:
    """Record the run on ``patch``: its metrics, the search ranking and the configuration it ran with."""
    patch.config["search"] = run.ranking
    patch.metrics.update(metrics)
    patch.config["clone_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(run.config).items()}
    return patch

@torch.no_grad()
def _evidence(
    patch: Patch, target: nn.Module, examples: Examples, config: CloneConfig, progress: bool
) -> tuple[GateInputs, torch.Tensor]:
    """What the gate of the attached patch would see for ``examples``, and the target's logits."""
    insertion = patch.config["insertion"]["name"]
    classifiers = patch.config["target"]["classifiers"]
    features, logits, pre_logits = _extract(
        target, [insertion], examples, config.feature_batch_size, None, "pnc: gate evidence", progress, classifiers
    )
    if pre_logits is None:
        pre_logits = logits.new_zeros(len(logits), 0)
    context = {k: v for k, v in examples.inputs.items() if k == "attention_mask"} if isinstance(examples.inputs, dict) else {}
    rows = []
    for index in torch.arange(len(logits)).split(256):
        batch_context = {k: v[index] for k, v in context.items()}
        rows.append(patch_gate_inputs(patch, features[insertion][index], logits[index], pre_logits[index], **batch_context))
    return GateInputs.cat(rows), logits


def _named(points: Sequence[Point], name: str, role: str) -> Point:
    for point in points:
        if point.name == name:
            return point
    raise InvalidInputError(f"{name!r} is not a {role} point; points: {[p.name for p in points]}")
