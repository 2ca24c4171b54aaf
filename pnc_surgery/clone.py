"""``clone(source, target, data)``: Partial Network Cloning, end to end.

1. Check the inputs (models, data, classes) before any training.
2. Find the source's cut points and the target's insertion points; precompute features at the candidates.
3. Search (cut, insertion) pairs jointly with successive halving (:mod:`pnc_surgery.search`).
4. Localize: prune the winning branch to what the cloned classes need (:mod:`pnc_surgery.localize`).
5. Train adapter and branch: feature matching to the source, distillation of its cloned-class logits.
6. Fit the gate for locality (:mod:`pnc_surgery.gate`) and package everything as a :class:`Patch`.
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
from .backends import backend_for
from .backends.base import ModelInputs, image_size, main_tensor
from .branch import SourceTail
from .data import Examples, batches, collect, to_view, with_shifted_copies
from .errors import InvalidInputError, UnsupportedModelError
from .evidence import GateInputs, patch_gate_inputs
from .gate import GATE_KINDS
from .localize import branch_parameters, find_prune_groups, keep_indices, masked, prune, unit_importance
from .patch import Patch
from .points import Point, classifier_names, eval_mode, find_points, trace_model
from .search import Candidate, FitData, evaluate, spread_points, successive_halving, train_candidate

__all__ = ["CloneConfig", "clone", "expected_image"]


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
    """``"auto"`` (``"novelty"`` with replay data, ``"energy"`` without), or one of ``pnc_surgery.gate.GATE_KINDS``:
    ``"learned"`` (the former default) and ``"none"`` are ablations."""
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


def _num_classes(model: nn.Module, inputs: ModelInputs) -> int:
    backend = backend_for(model)
    count = backend.num_classes(model)
    if count is None:
        with eval_mode(model):
            count = int(trace_model(model, inputs, backend).logits.shape[-1])
    return count


def expected_image(model: nn.Module) -> tuple[int, tuple[int, int]] | None:
    """``(channels, (H, W))`` of the images ``model`` expects by its own config; ``None`` for text models."""
    backend = backend_for(model)
    try:
        example = main_tensor(backend.example_input(model, batch_size=1), backend.main_input_name(model))
    except (UnsupportedModelError, InvalidInputError):
        return None
    if example.dim() != 4 or not example.is_floating_point():
        return None
    return int(example.shape[1]), (int(example.shape[2]), int(example.shape[3]))


def _call_inputs(model: nn.Module, inputs: ModelInputs) -> ModelInputs:
    """Data inputs in the form the model is called with (transformers take keywords)."""
    backend = backend_for(model)
    if backend.family == "transformers" and isinstance(inputs, torch.Tensor):
        return {backend.main_input_name(model): inputs}
    return inputs


def _runs_on(model: nn.Module, inputs: ModelInputs) -> str | None:
    try:
        with eval_mode(model), torch.no_grad():
            backend = backend_for(model)
            backend.logits(model(**inputs) if isinstance(inputs, dict) else model(inputs))
    except Exception as exc:  # any failure here means "this model cannot take these inputs"
        return f"{type(exc).__name__}: {exc}"
    return None


def _input_shape(inputs: ModelInputs) -> tuple[int, ...]:
    """Shape (without batch) of the data tensor, for error messages."""
    first = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
    return tuple(first.shape[1:])


def _source_view(source: nn.Module, sample: ModelInputs) -> tuple[int, tuple[int, int]] | None:
    """How clone images must be resized for the source (``None``: they fit as they are)."""
    if _runs_on(source, _call_inputs(source, sample)) is None:
        return None
    expected = expected_image(source)
    if expected is not None and _runs_on(source, _call_inputs(source, to_view(sample, *expected))) is None:
        return expected
    shape = _input_shape(sample)
    raise InvalidInputError(
        f"the source ({type(source).__name__}) cannot run on the clone data (inputs of shape {shape}"
        + (f"; it expects {expected}" if expected else "")
        + f"): {_runs_on(source, _call_inputs(source, sample))}"
    )


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
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Features at ``names``, logits and (with ``classifiers``) pre-logits for every example (eval mode, batched)."""
    backend = backend_for(model)
    wanted = set(names)
    features: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    logits, pre_logits = [], []
    total = (len(examples) + batch_size - 1) // batch_size
    with eval_mode(model):
        for batch in tqdm(batches(examples, batch_size), total=total, desc=desc, disable=not progress, leave=False):
            inputs = _call_inputs(model, to_view(batch.inputs, *view) if view else batch.inputs)
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


def _with_blocks_after(model: nn.Module, points: list[Point], inputs: ModelInputs, min_share: float = 0.02) -> list[Point]:
    """Points that leave source blocks in the branch: a cut after the last block would clone only head rows.

    A tail must hold at least ``min_share`` of the model's parameters besides the classifier.
    """
    backend = backend_for(model)
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
    for role, model in (("source", source), ("target", target)):
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"{role} must be a torch.nn.Module classifier, got {type(model).__name__}")
    examples = collect(data, "data")
    sample = examples.select(torch.arange(min(2, len(examples))))
    target_error = _runs_on(target, _call_inputs(target, sample.inputs))
    if target_error:
        shape = _input_shape(sample.inputs)
        raise InvalidInputError(f"the target ({type(target).__name__}) cannot run on the clone data (inputs of shape {shape}): {target_error}")
    view = _source_view(source, sample.inputs)
    source_sample = _call_inputs(source, to_view(sample.inputs, *view) if view else sample.inputs)
    num_source_classes = _num_classes(source, source_sample)
    labels = examples.labels
    bad = labels[(labels < 0) | (labels >= num_source_classes)].unique().tolist()
    if bad:
        raise InvalidInputError(f"labels {bad} are not classes of the source, which has {num_source_classes} classes")
    present = sorted(labels.unique().tolist())
    classes = list(present if classes is None else classes)
    if not classes:
        raise InvalidInputError("classes is empty: name at least one source class to clone")
    if len(set(classes)) != len(classes):
        raise InvalidInputError(f"classes has duplicates: {classes}")
    outside = [c for c in classes if not 0 <= int(c) < num_source_classes]
    missing = [c for c in classes if c not in present]
    if outside or missing:
        raise InvalidInputError(
            f"classes {outside or missing} " + ("are not classes of the source" if outside else f"have no examples in data (it has {present})")
        )
    keep = torch.isin(labels, torch.tensor(classes))
    examples = examples.select(keep.nonzero().flatten())
    local_labels = torch.tensor([classes.index(int(y)) for y in examples.labels])
    replay_examples = collect(replay, "replay", labelled=False) if replay is not None else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        patch = _clone(
            source, target, examples, local_labels, classes, replay_examples, view, source_sample,
            _call_inputs(target, sample.inputs), config, generator, progress,
        )
    patch.metrics["clone_seconds"] = round(time.perf_counter() - started, 2)
    patch.metrics["seed"] = seed
    patch.config["clone_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    return patch


def _clone(
    source: nn.Module,
    target: nn.Module,
    examples: Examples,
    labels: torch.Tensor,
    classes: list[int],
    replay: Examples | None,
    view: Any,
    source_sample: ModelInputs,
    target_sample: ModelInputs,
    config: CloneConfig,
    generator: torch.Generator,
    progress: bool,
) -> Patch:
    metrics: dict[str, Any] = {"clone_examples": len(examples), "cloned_classes": len(classes)}
    source_points = _with_blocks_after(source, find_points(source, source_sample), source_sample)
    target_points = find_points(target, target_sample)
    source_size = image_size(source_sample)
    target_size = image_size(target_sample)
    budget = config.feature_memory_gb * 2**30
    searched_cuts = spread_points(_affordable(source_points, len(examples), budget), config.max_cuts)
    searched_insertions = spread_points(_affordable(target_points, len(examples), budget), config.max_insertions)
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

    target_features, target_logits, _ = _extract(
        target, sorted({p.name for _, p in pairs}), examples, config.feature_batch_size, None, "pnc: target features", progress
    )
    source_features, source_logits, _ = _extract(
        source, sorted({c.name for c, _ in pairs}), examples, config.feature_batch_size, view, "pnc: source features", progress
    )
    teacher = source_logits[:, classes]
    metrics["source_local_accuracy"] = round(float((teacher.argmax(-1) == labels).float().mean()), 4)
    context = {}
    if isinstance(examples.inputs, dict):
        context = {k: v for k, v in examples.inputs.items() if k == "attention_mask"}
    fit_index, held_index = _stratified_split(labels, config.heldout_fraction, generator)
    if len(held_index) == 0:
        held_index = fit_index

    branches: dict[str, SourceTail] = {}
    for cut in {c.name: c for c, _ in pairs}.values():
        branch = SourceTail.from_model(source, cut, source_sample)
        branch.keep_classes(classes)
        for parameter in branch.parameters():
            parameter.requires_grad_(False)
        branches[cut.name] = branch
    candidates = [
        Candidate(c, p, branches[c.name], Adapter(feature_spec(p, target_size), feature_spec(c, source_size), config.adapter_hidden))
        for c, p in pairs
    ]
    for candidate in candidates:
        sample = _least_squares_rows(fit_index, candidate.insertion, generator)
        candidate.adapter.fit_least_squares(target_features[candidate.insertion.name][sample], source_features[candidate.cut.name][sample])

    def rows(candidate: Candidate, index: torch.Tensor) -> FitData:
        return FitData(
            target_features[candidate.insertion.name][index],
            source_features[candidate.cut.name][index],
            teacher[index],
            labels[index],
            {k: v[index] for k, v in context.items()},
        )

    train_kwargs = dict(lr=config.lr, batch_size=config.batch_size, temperature=config.temperature, feature_weight=config.feature_weight)
    if len(candidates) > 1:
        winner, ranking = successive_halving(
            candidates, lambda c: rows(c, fit_index), lambda c: rows(c, held_index),
            first_steps=config.search_steps, generator=generator, progress=progress, **train_kwargs,
        )
    else:
        winner, ranking = candidates[0], [candidates[0].record()]
    metrics.update(cut=winner.cut.name, insertion=winner.insertion.name, pairs_searched=len(candidates))

    branch = winner.branch
    full_params = branch_parameters(branch)
    cut_features = source_features[winner.cut.name]
    branch_data = [
        (cut_features[b], labels[b], {k: v[b] for k, v in context.items()})
        for b in torch.arange(len(labels)).split(config.batch_size)
    ]
    metrics["branch_local_accuracy"] = round(_branch_accuracy(branch, branch_data), 4)
    ratio = 1.0
    if config.localize:
        ratio = _localize(branch, branch_data, config, metrics, progress)
    metrics["kept_ratio"] = round(branch_parameters(branch) / max(full_params, 1), 4)
    metrics["branch_parameters"] = branch_parameters(branch)
    metrics["unpruned_branch_parameters"] = full_params
    metrics["prune_keep_ratio"] = ratio

    fit = rows(winner, fit_index)
    with tqdm(total=config.train_steps, desc="pnc: train adapter + branch", disable=not progress, leave=False) as bar:
        train_candidate(
            winner, fit, config.train_steps, generator=generator, progress=bar.update,
            branch_lr=config.branch_lr if config.finetune_branch else 0.0, **train_kwargs,
        )
    accuracy, _ = evaluate(winner, rows(winner, held_index), config.temperature, config.feature_weight)
    metrics["heldout_local_accuracy"] = round(accuracy, 4)

    kind = config.gate if config.gate != "auto" else ("novelty" if replay is not None else "energy")
    patch = Patch.compose(
        source, target, winner.cut, winner.insertion, branch, winner.adapter, kind,
        target_input=target_sample, source_kwargs=config.source_kwargs or None,
    )
    patch.eval()
    positives, _ = _evidence(patch, target, examples, config, progress)
    negatives = negative_groups = negative_sources = None
    if replay is not None:
        replay, negative_sources = with_shifted_copies(replay) if config.shift_replay else (replay, None)
        negatives, replay_logits = _evidence(patch, target, replay, config, progress)
        labels_given = replay.labels is not None and bool(((replay.labels >= 0) & (replay.labels < replay_logits.shape[1])).all())
        negative_groups = replay.labels if labels_given else replay_logits.argmax(-1)
    metrics.update(patch.gate.fit(
        positives, labels, negatives, negative_groups, negative_sources=negative_sources,
        max_false_positive_rate=config.max_false_positive_rate, seed=int(torch.randint(2**31, (), generator=generator)),
    ))
    patch.config["search"] = ranking
    patch.metrics.update(metrics)
    return patch


@torch.no_grad()
def _evidence(patch: Patch, target: nn.Module, examples: Examples, config: CloneConfig, progress: bool) -> tuple[GateInputs, torch.Tensor]:
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
        rows.append(patch_gate_inputs(patch, features[insertion][index], logits[index], pre_logits[index], **{k: v[index] for k, v in context.items()}))
    return GateInputs.cat(rows), logits


@torch.no_grad()
def _branch_accuracy(branch: SourceTail, data: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> float:
    correct = sum(int((branch(f, **c).argmax(-1) == y).sum()) for f, y, c in data)
    return correct / max(sum(len(y) for _, y, _ in data), 1)


def _localize(branch: SourceTail, data: list, config: CloneConfig, metrics: dict, progress: bool) -> float:
    """Prune ``branch`` in place; returns the keep ratio used."""
    probe_feature, _, probe_context = data[0]
    groups = find_prune_groups(branch, probe_feature[:8], {k: v[:8] for k, v in probe_context.items()})
    metrics["prune_groups"] = len(groups)
    if not groups:
        return 1.0
    for parameter in branch.parameters():
        parameter.requires_grad_(True)
    scores = unit_importance(branch, groups, data)
    for parameter in branch.parameters():
        parameter.requires_grad_(False)
    baseline = _branch_accuracy(branch, data)
    ratio = config.keep_ratio
    if ratio is None:
        ratio = 1.0
        for candidate in tqdm(sorted(config.keep_ratios), desc="pnc: localize", disable=not progress, leave=False):
            with masked(branch, keep_indices(groups, scores, candidate)):
                accuracy = _branch_accuracy(branch, data)
            if accuracy >= baseline - config.accuracy_tolerance:
                ratio = candidate
                break
    if ratio < 1.0:
        prune(branch, groups, keep_indices(groups, scores, ratio))
    metrics["pruned_branch_local_accuracy"] = round(_branch_accuracy(branch, data), 4)
    return ratio


def _named(points: Sequence[Point], name: str, role: str) -> Point:
    for point in points:
        if point.name == name:
            return point
    raise InvalidInputError(f"{name!r} is not a {role} point; points: {[p.name for p in points]}")
