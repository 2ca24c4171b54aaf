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

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .adapters import Adapter, FeatureSpec, feature_spec
from .backends import Backend, backend_for
from .backends.base import ModelInputs, image_size
from .branch import Branch
from .data import (
    Examples,
    batches,
    check_replay,
    check_target_input,
    collect,
    model_device,
    select_classes,
    short,
    source_transform,
    to_device,
    with_shifted_copies,
)
from .errors import CloneError, InvalidInputError, UnsupportedModelError
from .evidence import GateInputs, patch_gate_inputs
from .gate import AUTO_ALTERNATIVES, DISCRIMINANT_KINDS, GATE_KINDS
from .localize import branch_parameters, local_accuracy, localize
from .patch import Patch
from .points import Point, find_points
from .preprocess import encode, is_raw
from .search import (
    Candidate,
    FitData,
    evaluate,
    spread_points,
    standard_error,
    successive_halving,
    train_candidate,
)
from .tracing import classifier_names, eval_mode, trace_model

__all__ = ["BUDGETS", "Budget", "CloneConfig", "CloneRun", "clone"]


PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""Values of ``CloneConfig.precision``."""

logger = logging.getLogger(__name__)

WORKING_SHARE = 0.25
"""Share of ``CloneConfig.memory_gb`` that bounds the working memory of the chunked steps (least-squares starts,
localization, gate evidence); the rest holds what the run keeps (cached features, branches, adapters)."""

TRAINING_COPIES = 5
"""Copies of a trained tensor a training keeps: the tensor, its gradient, AdamW's two moments and the best weights."""

LOCALIZE_EXAMPLES = 512
"""Clone examples localization scores units and keep ratios on (a class-stratified sample of them past that): each
keep ratio tried costs a pass of the branch over them, and which units matter is settled long before."""

MIN_EVAL_STEPS = 10
"""The final training scores its held-out data every pass over the data, but never more often than this."""

AUTO_BRANCH_SHARE = 0.15
"""The branch budget ``CloneConfig(max_branch_share="auto")`` sets on a large enough clone set."""

AUTO_BUDGET_EXAMPLES = 250
"""Clone examples of every cloned class from which ``"auto"`` sets :data:`AUTO_BRANCH_SHARE`: the final training
wins back what the tighter pruning loses only with enough data (README, "Patch size": on Fashion-MNIST the budget cost
0.8 points of ``acc_all`` at 20 images per class, 0.2 at 250 and 0.4 at 512; on 120 digit images per class 1-4 points
on the ViT pairs)."""


@dataclass(frozen=True)
class Budget:
    """How much work one :data:`BUDGETS` level spends, in passes over the clone data it keeps.

    Attributes:
        images_per_class: clone examples kept per class (a seeded random sample; ``None``: all). Every stage works
            on what is kept, so the cost stops growing with the data past it, as a fine-tune's fixed step count
            does.
        search_epochs: training of each surviving pair in the search's first round (doubled each later round),
            at most ``max_search_steps`` mini-batches.
        survivors: pairs that round zero (every pair scored untrained, from its least-squares start) keeps at least;
            it keeps the best pair of every cut in any case.
        train_epochs: most passes of the final training (it stops early when held-out accuracy stalls), at most
            ``max_train_steps`` mini-batches.
        patience: held-out evaluations (one a pass) without improvement before the final training stops.
        check_gates: fit a trial gate for the search's winner and the best pair of every insertion point and keep
            the pair whose cloned inputs would come through best (:func:`check_gates`; about one more gate fit).
    """

    images_per_class: int | None
    search_epochs: float
    max_search_steps: int | None
    survivors: int
    train_epochs: float
    max_train_steps: int | None
    patience: int
    check_gates: bool

    def search_steps(self, examples: int, batch_size: int) -> int:
        """First-round training steps of each searched pair on ``examples`` training examples."""
        return _steps(self.search_epochs, examples, batch_size, self.max_search_steps)

    def train_steps(self, examples: int, batch_size: int) -> int:
        """Most final training steps on ``examples`` training examples."""
        return _steps(self.train_epochs, examples, batch_size, self.max_train_steps)


def _steps(epochs: float, examples: int, batch_size: int, cap: int | None) -> int:
    """Mini-batch steps for ``epochs`` passes over ``examples``, at most ``cap``."""
    steps = max(1, math.ceil(epochs * examples / batch_size))
    return steps if cap is None else min(steps, cap)


BUDGETS: dict[str, Budget] = {
    "fast": Budget(
        images_per_class=256,
        search_epochs=1,
        max_search_steps=8,
        survivors=2,
        train_epochs=10,
        max_train_steps=60,
        patience=2,
        check_gates=False,
    ),
    "default": Budget(
        images_per_class=512,
        search_epochs=2,
        max_search_steps=16,
        survivors=3,
        train_epochs=30,
        max_train_steps=150,
        patience=4,
        check_gates=True,
    ),
    "thorough": Budget(
        images_per_class=None,
        search_epochs=6,
        max_search_steps=None,
        survivors=6,
        train_epochs=100,
        max_train_steps=None,
        patience=8,
        check_gates=True,
    ),
}
"""The levels of ``CloneConfig.budget``. ``"default"`` trains about as many mini-batches as a fine-tune of the target
would (150 final steps at most; ``benchmarks.clone_cost`` measures the two side by side); on small data sets the
passes bind first."""


@dataclass
class CloneConfig:
    """How :func:`clone` spends its budget. Defaults suit tens to hundreds of images per class on a CPU."""

    budget: str = "default"
    """Overall effort, one of :data:`BUDGETS` (``"fast"``, ``"default"``, ``"thorough"``): how long the search trains
    each pair, how many pairs survive its first look, whether the finalists' gates are tried (:func:`check_gates`)
    and how long the final training may run. ``search_steps`` and ``train_steps``, when set, override it."""
    images_per_class: int | None = None
    """Clone examples kept per class, a seeded random sample of each class (``None``: the ``budget``'s, 512 by
    default, all with ``"thorough"``). Past a few hundred images per class more data mostly costs time."""
    search_positions: bool = True
    """Search (cut, insertion) pairs jointly; ``False`` cuts at the source's last stage and inserts at the
    target's (ablation)."""
    max_cuts: int = 3
    """Source cut points considered (evenly spaced over the source's depth, stage ends first)."""
    max_insertions: int = 3
    """Target insertion points considered (evenly spaced over the target's depth, stage ends first)."""
    cut: str | None = None
    """Force this source cut point (a module name from ``find_points``)."""
    insertion: str | None = None
    """Force this target insertion point."""
    search_steps: int | None = None
    """Adapter training steps per pair in the first search round (doubled each round for the survivors); ``None``:
    from ``budget`` and the data size."""
    cost_weight: float = 0.02
    """What the search gives up for a cheaper patch. A pair's cost is the share of the source its branch copies
    (mean of the parameter share and the FLOP share, in [0, 1]); its score is its held-out local accuracy (less 0.01
    times its held-out loss) less ``cost_weight`` times its cost. Pairs whose scores lie within one standard error
    of the best (from the held-out size: about 3 points at 72 held-out images, 6 at 21) count as equally good, and
    the cheapest of them wins (``pnc_surgery.search.ranked``). At 0.02 a branch that copies the whole source must
    moreover be 2 points more accurate than one that copies none of it. Raise it to buy bytes with accuracy: the
    search trains each pair briefly, and a deep cut's adapter needs more training to show its accuracy than one
    right after a patch embedding, so a higher weight picks deep cuts sooner, also where they are worse (the
    README's cost section measures both); ``0`` ignores the cost (the lower held-out loss wins within the noise)."""
    localize: bool = True
    """Prune the branch to what the cloned classes need; ``False`` keeps the full source tail (ablation)."""
    keep_ratio: float | None = None
    """Fraction of prunable units to keep; ``None`` picks the smallest that keeps local accuracy within
    ``accuracy_tolerance``."""
    keep_ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7)
    """Ratios tried when ``keep_ratio`` is ``None``."""
    accuracy_tolerance: float = 0.01
    """Local accuracy (on the clone data) that pruning may cost, as a mask measures it before the final training."""
    max_branch_share: float | Literal["auto"] | None = "auto"
    """The most of the source's parameters the pruned branch may keep (with ``localize`` on and ``keep_ratio``
    ``None``): the keep ratios that ``accuracy_tolerance`` allows are lowered together through ``keep_ratios`` until
    the branch fits, down to the smallest (a branch of a whole ViT keeps its residual width and can stay above it).
    The final training, which distils the source into the pruned branch, wins back what the tighter pruning loses
    only with enough data, so ``"auto"`` sets 0.15 (``AUTO_BRANCH_SHARE``) when every cloned class has at least 250
    clone examples (``AUTO_BUDGET_EXAMPLES``) and no budget below that; a number always applies, ``None`` never. The
    adapter and the gate come on top of the branch. README, "Patch size": on the Fashion headline 0.15 makes patches
    0.44x -> 0.23x the source's bytes for 0.4 points of ``acc_all``."""
    adapter_hidden: int = 64
    """Width of the adapter's residual bottleneck (0: a single 1x1 projection)."""
    train_steps: int | None = None
    """Most final training steps of the adapter (and branch); ``None``: from ``budget`` and the data size. The
    training stops earlier when held-out local accuracy stops improving."""
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
    """Also calibrate the gate on copies of the replay inputs: images shifted by 1/8 of their size, token inputs each
    missing one token (``pnc_surgery.data.with_shifted_copies``). The target has usually trained on its replay
    inputs and is surer of them than of new ones, so a gate calibrated on them alone lets more new target-domain
    inputs through than its budget."""
    heldout_fraction: float = 0.2
    """Share of the clone data kept out of training to score the search and report accuracy."""
    feature_batch_size: int = 128
    """Batch size for feature extraction."""
    precision: str | None = None
    """Run feature extraction and training under ``torch.autocast`` at this precision (``"bfloat16"``, or
    ``"float16"`` on CUDA); ``None``: full precision. The patch's own tensors stay float32."""
    memory_gb: float = 2.0
    """Memory the clone may use besides the two models and one batch of their activations (on the source's device).
    ``1 - WORKING_SHARE`` of it holds what the run keeps: every searched point's features for the whole clone set,
    one branch (source tail) per searched cut and one adapter per pair with their training state; the rest bounds
    the working memory of the chunked steps (least-squares starts, localization, gate evidence). Points and pairs that
    do not fit (early, high-resolution points of large models) are left out of the search, logged on
    ``pnc_surgery.clone`` and counted in ``patch.metrics["memory_skipped"]``; when not even one pair fits, ``clone``
    raises ``InvalidInputError`` before any training, saying what it would need. Replaces ``feature_memory_gb``."""
    source_kwargs: dict[str, Any] = field(default_factory=dict)
    """timm ``create_model`` kwargs of the source when they cannot be inferred (see ``backends.timm.create_model``)."""

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise InvalidInputError(f"budget must be one of {sorted(BUDGETS)}, got {self.budget!r}")
        if self.precision not in (None, *PRECISIONS):
            raise InvalidInputError(f"precision must be None or one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.gate not in ("auto", *GATE_KINDS):
            raise InvalidInputError(f"gate must be 'auto' or one of {GATE_KINDS}, got {self.gate!r}")
        for name in ("search_positions", "localize", "finetune_branch", "shift_replay"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("cut", "insertion"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"{name} must be a module name or None, got {getattr(self, name)!r}")
        if not isinstance(self.source_kwargs, dict):
            raise InvalidInputError(f"source_kwargs must be a dict, got {type(self.source_kwargs).__name__}")
        for name, minimum in _INT_FIELDS.items():
            value = getattr(self, name)
            if value is None and _FIELD_DEFAULTS[name] is None:  # None: "from the budget"
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise InvalidInputError(f"{name} must be an integer of at least {minimum}, got {value!r}")
        for name, (low, high, closed_low, closed_high) in _REAL_FIELDS.items():
            _check_real(name, getattr(self, name), low, high, closed_low, closed_high)
        if self.keep_ratio is not None:
            _check_real("keep_ratio", self.keep_ratio, 0, 1, False, True)
        if isinstance(self.max_branch_share, str) and self.max_branch_share != "auto":
            raise InvalidInputError(
                f"max_branch_share must be 'auto', None or a share in (0, 1], got {self.max_branch_share!r}"
            )
        if self.max_branch_share not in (None, "auto"):
            _check_real("max_branch_share", self.max_branch_share, 0, 1, False, True)
        if not isinstance(self.keep_ratios, (tuple, list)) or not self.keep_ratios:
            raise InvalidInputError(f"keep_ratios must be a non-empty sequence of ratios, got {self.keep_ratios!r}")
        for ratio in self.keep_ratios:
            _check_real("keep_ratios", ratio, 0, 1, False, True)


_INT_FIELDS = {
    "max_cuts": 1,
    "max_insertions": 1,
    "search_steps": 1,
    "train_steps": 1,
    "images_per_class": 1,
    "batch_size": 1,
    "adapter_hidden": 0,
    "feature_batch_size": 1,
}
"""Integer fields of :class:`CloneConfig` and their smallest value (those that default to ``None`` may be ``None``)."""

_FIELD_DEFAULTS = {f.name: f.default for f in fields(CloneConfig)}

_REAL_FIELDS = {
    "lr": (0.0, math.inf, False, False),
    "branch_lr": (0.0, math.inf, True, False),
    "temperature": (0.0, math.inf, False, False),
    "feature_weight": (0.0, math.inf, True, False),
    "cost_weight": (0.0, math.inf, True, False),
    "accuracy_tolerance": (0.0, 1.0, True, True),
    "max_false_positive_rate": (0.0, 1.0, False, False),
    "heldout_fraction": (0.0, 1.0, False, False),
    "memory_gb": (0.0, math.inf, False, False),
}
"""Real fields of :class:`CloneConfig`: ``(low, high, low allowed, high allowed)``; all must be finite."""


def _check_real(name: str, value: Any, low: float, high: float, closed_low: bool, closed_high: bool) -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is a finite real number in the given interval."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    above = value >= low if closed_low else value > low
    below = value <= high if closed_high else value < high
    if not (above and below):
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
        raise InvalidInputError(f"{name} must be in {interval}, got {value!r}")


Extracted = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]
"""Features at the named points, logits and (with classifiers) pre-logits of a batch, one row an example."""


@torch.no_grad()
def _extracted_batches(
    model: nn.Module,
    names: Sequence[str],
    examples: Examples,
    batch_size: int,
    transform: Callable[[ModelInputs], ModelInputs] | None,
    desc: str,
    progress: bool,
    classifiers: Sequence[str] = (),
    backend: Backend | None = None,
    precision: torch.dtype | None = None,
) -> Iterator[Extracted]:
    """:data:`Extracted` for one batch of ``examples`` at a time (eval mode), on the model's device.

    Batches go to the model's device one at a time (under autocast with ``precision``); only the named points'
    outputs are kept."""
    backend = backend or backend_for(model)
    device, wanted = model_device(model), set(names)
    total = (len(examples) + batch_size - 1) // batch_size
    with eval_mode(model):
        for batch in tqdm(batches(examples, batch_size), total=total, desc=desc, disable=not progress, leave=False):
            inputs = to_device(transform(batch.inputs) if transform else batch.inputs, device)
            with _autocast(device, precision):
                trace = trace_model(
                    model,
                    backend.call_inputs(model, inputs),
                    backend,
                    keep=wanted.__contains__,
                    classifiers=list(classifiers),
                )
            outputs = {name: trace.calls[name].output for name in names}
            assert all(o is not None for o in outputs.values()), "points are modules with a single tensor output"
            yield {k: v for k, v in outputs.items() if v is not None}, trace.logits, trace.pre_logits


def _extract(
    model: nn.Module,
    names: Sequence[str],
    examples: Examples,
    batch_size: int,
    transform: Callable[[ModelInputs], ModelInputs] | None,
    desc: str,
    progress: bool,
    backend: Backend | None = None,
    store: torch.device | None = None,
    precision: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features at ``names`` and logits for every example, in float32 on ``store`` (default: the CPU).

    Each output is allocated once for all examples and filled batch by batch (no second copy to concatenate)."""
    store = store or torch.device("cpu")
    columns: dict[str | None, torch.Tensor] = {}  # None: the logits
    done = 0
    for features, logits, _ in _extracted_batches(
        model, names, examples, batch_size, transform, desc, progress, backend=backend, precision=precision
    ):
        for name, tensor in [*features.items(), (None, logits)]:
            if name not in columns:
                dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
                columns[name] = torch.empty((len(examples), *tensor.shape[1:]), dtype=dtype, device=store)
            columns[name][done : done + len(tensor)] = tensor
        done += len(logits)
    logits = columns.pop(None)
    return {name: tensor for name, tensor in columns.items() if name is not None}, logits


def _autocast(device: torch.device, precision: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` at ``precision``; nothing when ``precision`` is ``None``.

    The cast-weight cache is off: a stage runs many optimiser steps inside one autocast region, and cached casts
    would keep the weights of the first step."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision, cache_enabled=False)


def _with_blocks_after(
    model: nn.Module, backend: Backend, points: list[Point], inputs: ModelInputs, min_share: float = 0.02
) -> tuple[list[Point], dict[str, int]]:
    """Points that leave source blocks in the branch (a cut after the last block would clone only head rows), and
    the parameters a branch cut at each of them copies (its classifier included).

    A tail must hold at least ``min_share`` of the model's parameters besides the classifier.
    """
    with eval_mode(model):
        trace = trace_model(model, inputs, backend)
    head = set(classifier_names(trace, int(trace.logits.shape[-1]), after=-1))
    total = sum(p.numel() for p in model.parameters())
    leaves = [c for c in trace.calls.values() if not any(True for _ in c.module.children())]
    head_parameters = sum(p.numel() for c in leaves if c.name in head for p in c.module.parameters(recurse=False))
    kept, tails = [], {}
    for point in points:
        cut_post = trace.calls[point.name].post
        after = sum(
            p.numel() for c in leaves if c.pre > cut_post and c.name not in head for p in c.module.parameters(False)
        )
        if after >= min_share * total:
            kept.append(point)
            tails[point.name] = after + head_parameters
    if not kept:
        raise UnsupportedModelError(f"{type(model).__name__} has no cut point with source blocks after it")
    return kept, tails


class _Memory:
    """What a clone's search keeps and works with, in bytes, against ``CloneConfig.memory_gb``.

    Kept for the whole run: every searched point's float32 features for the clone set, one branch per cut, one
    adapter per pair, each trained tensor :data:`TRAINING_COPIES` times, and the winner's branch as often again.
    Working (``WORKING_SHARE`` of the budget): one least-squares start at a time, half for its rows and half for its
    chunks.
    """

    def __init__(
        self,
        config: CloneConfig,
        examples: int,
        tails: Mapping[str, int],
        source_size: tuple[int, int] | None,
        target_size: tuple[int, int] | None,
    ) -> None:
        self.budget, self.examples, self.tails = config.memory_gb * 2**30, examples, tails
        self.hidden, self.kept_budget = config.adapter_hidden, (1 - WORKING_SHARE) * self.budget
        self.working_budget = WORKING_SHARE * self.budget
        self.source_size, self.target_size = source_size, target_size
        self.skipped: list[str] = []

    def point(self, point: Point, role: str) -> int:
        """Bytes a searched point keeps: its features for every example and, for a cut, its branch."""
        branch = self.tails.get(point.name, 0) if role == "source" else 0
        return 4 * (self.examples * math.prod(point.shape) + branch)

    def adapter(self, cut: Point, insertion: Point) -> Adapter:
        """The pair's adapter, on the meta device (shapes only, no memory)."""
        with torch.device("meta"):
            return Adapter(feature_spec(insertion, self.target_size), feature_spec(cut, self.source_size), self.hidden)

    def need(self, pairs: Sequence[tuple[Point, Point]]) -> int:
        """Bytes a search over ``pairs`` keeps for the whole run."""
        cuts, insertions = {c.name: c for c, _ in pairs}, {p.name: p for _, p in pairs}
        adapters = sum(p.numel() for c, i in pairs for p in self.adapter(c, i).parameters())
        branches = [self.tails.get(name, 0) for name in cuts]
        return (
            sum(self.point(c, "source") for c in cuts.values())
            + sum(self.point(p, "target") for p in insertions.values())
            + 4 * TRAINING_COPIES * adapters
            + 4 * (TRAINING_COPIES - 1) * max(branches)
        )

    def start(self, cut: Point, insertion: Point) -> int:
        """Working bytes of the pair's least-squares start with one row: the row's features and its chunk."""
        features = 4 * (math.prod(insertion.shape) + math.prod(cut.shape))
        return 2 * max(self.adapter(cut, insertion).least_squares_bytes(), features)

    def fits(self, pairs: Sequence[tuple[Point, Point]]) -> bool:
        return self.need(pairs) <= self.kept_budget

    def affordable(self, points: list[Point], role: str) -> list[Point]:
        """The points whose own features (and branch) fit, or else the cheapest (a later check reports its need)."""
        kept = [p for p in points if self.point(p, role) <= self.kept_budget]
        for point in points:
            if point not in kept:
                self._skip(f"{role} point {point.name}", self.point(point, role))
        return kept or [min(points, key=lambda p: self.point(p, role))]

    def startable(self, pairs: list[tuple[Point, Point]]) -> list[tuple[Point, Point]]:
        """The pairs whose least-squares start fits the working memory one row at a time."""
        kept = []
        for cut, insertion in pairs:
            if self.start(cut, insertion) <= self.working_budget:
                kept.append((cut, insertion))
            else:
                self._skip(f"the least-squares start of ({cut.name}, {insertion.name})", self.start(cut, insertion))
        return kept

    def without_costliest(self, pairs: list[tuple[Point, Point]]) -> list[tuple[Point, Point]]:
        """``pairs`` less those of the point whose removal saves the most (empty when one pair is left)."""
        points = {(0, c.name): c for c, _ in pairs} | {(1, p.name): p for _, p in pairs}
        options = [[pair for pair in pairs if pair[side].name != name] for side, name in points]
        if len(pairs) == 1 or not any(options):
            return []
        (side, name), kept = min(
            ((key, option) for key, option in zip(points, options) if option), key=lambda item: self.need(item[1])
        )
        role = ("source", "target")[side]
        self._skip(f"{role} point {name} beside the other searched points", self.need(pairs) - self.need(kept))
        return kept

    def cheapest(self, pairs: list[tuple[Point, Point]]) -> list[tuple[Point, Point]]:
        """The one pair of ``pairs`` that needs the smallest budget, when it fits.

        Raises:
            InvalidInputError: it does not fit (the message says what budget it would need).
        """

        def budget(pair: tuple[Point, Point]) -> float:
            return max(self.need([pair]) / (1 - WORKING_SHARE), self.start(*pair) / WORKING_SHARE)

        cut, insertion = best = min(pairs, key=budget)
        if budget(best) > self.budget:
            raise InvalidInputError(
                f"memory_gb={self.budget / 2**30:g} is too small to clone from {self.examples} examples: the "
                f"cheapest pair, cut {cut.name} {tuple(cut.shape)} and insertion {insertion.name} "
                f"{tuple(insertion.shape)}, keeps {self.need([best]) / 2**30:.3g} GB (features, branch and adapter "
                f"state; {1 - WORKING_SHARE:.0%} of the budget) and starts with {self.start(*best) / 2**30:.3g} GB "
                f"({WORKING_SHARE:.0%}); set memory_gb to at least {budget(best) / 2**30:.3g} or clone from fewer "
                "examples"
            )
        logger.info("searching only (%s, %s), the cheapest pair that fits memory_gb", cut.name, insertion.name)
        return [best]

    def _skip(self, what: str, need: int) -> None:
        reason = f"{what} needs {need / 2**30:.3g} GB, more than memory_gb={self.budget / 2**30:g} allows"
        logger.info("left out of the search: %s", reason)
        self.skipped.append(reason)


def _least_squares_rows(
    index: torch.Tensor, adapter: Adapter, generator: torch.Generator, max_bytes: float, max_rows: int = 2**18
) -> torch.Tensor:
    """Examples for an adapter's least-squares start: at most ``max_rows`` input feature positions in all, and no
    more than ``max_bytes`` of float32 features at both ends."""
    shape = adapter.insertion.shape
    positions = math.prod(shape[1:]) if adapter.insertion.layout == "NCHW" else math.prod(shape[:-1])
    row_bytes = 4 * (math.prod(adapter.insertion.shape) + math.prod(adapter.cut.shape))
    count = min(len(index), max(16, max_rows // max(positions, 1)), max(1, int(max_bytes // row_bytes)))
    return index[torch.randperm(len(index), generator=generator)[:count]]


def _last_stage(points: Sequence[Point]) -> Point:
    """The last point whose shape differs from the final one: where the last stage starts."""
    final = points[-1].shape
    for point in reversed(points):
        if point.shape != final:
            return point
    return points[len(points) // 2]


def _stratified_split(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    fit, held = [], []
    for value in labels.unique():
        index = (labels == value).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        count = round(fraction * len(index)) if len(index) > 1 else 0
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
    source_input: Callable[[ModelInputs], ModelInputs] | None
    """How inputs in the target's format (or, with raw data, the source's own) become the source's (``None``: as
    they are)."""
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
    """Keyword inputs a branch may read besides the feature (see :func:`_branch_context`)."""
    fit_index: torch.Tensor | None = None
    held_index: torch.Tensor | None = None
    candidates: list[Candidate] = field(default_factory=list)
    winner: Candidate | None = None
    ranking: list[dict] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        """Where adapters and the branch train: the source's device (the branch is a copy of the source)."""
        return model_device(self.source)

    @property
    def precision(self) -> torch.dtype | None:
        return PRECISIONS[self.config.precision] if self.config.precision else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast on the training device at the configured precision (or nothing)."""
        return _autocast(self.device, self.precision)

    def rows(self, candidate: Candidate, index: torch.Tensor) -> FitData:
        """Training rows of ``candidate`` (its insertion's and cut's features) for the examples in ``index``, as a
        view of the cached features (a batch is copied when it is drawn, never the whole set)."""
        assert self.teacher is not None, "prepare() first"
        return _CachedRows(
            self.target_features[candidate.insertion.name],
            self.source_features[candidate.cut.name],
            self.teacher,
            self.labels,
            self.context,
            index=index,
        )

    @property
    def budget(self) -> Budget:
        return BUDGETS[self.config.budget]

    def train_kwargs(self) -> dict[str, Any]:
        """The loss and optimiser settings every adapter training of the run shares."""
        config = self.config
        return dict(
            lr=config.lr,
            batch_size=config.batch_size,
            temperature=config.temperature,
            feature_weight=config.feature_weight,
        )


@dataclass
class _CachedRows(FitData):
    """The rows ``index`` of cached tensors, without copying them: :meth:`rows` picks a batch through ``index``."""

    index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, index: torch.Tensor) -> FitData:
        return FitData.rows(self, self.index[index])

    def to(self, device: torch.device) -> FitData:
        return self.rows(torch.arange(len(self))).to(device)


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
    source_transform: Callable[[ModelInputs], ModelInputs] | None = None,
    source_processor: Any = None,
    target_processor: Any = None,
    image_column: str = "image",
    label_column: str = "label",
    text_column: str = "text",
) -> Patch:
    """Clone classes of ``source`` into ``target`` as a :class:`Patch` (neither model is modified).

    Args:
        source: classifier that knows the classes to clone (timm or transformers, to save the patch).
        target: classifier that gains them.
        data: labelled examples of the classes to clone (``Dataset``, ``DataLoader`` or iterable of
            ``(x, y)``; ``y`` are source class ids). Tensors are in the target's input format; for the source they
            are resized when it expects another size, and normalised again when both models record their
            normalisation and the two differ (or mapped by ``source_transform``). Raw data (``(PIL image | path |
            string, label)`` pairs, an image folder with one sub-folder per class id or label name, or
            ``datasets``-like rows) is preprocessed for each model in its own format (:mod:`pnc_surgery.preprocess`).
        classes: source classes to clone, as class ids or the source's label names, in output order (default:
            the classes present in ``data``).
        replay: optional target-domain inputs (with or without labels) that help the gate protect the
            target's own answers.
        config: budgets and ablations (:class:`CloneConfig`).
        seed: makes the whole run reproducible.
        progress: show progress bars.
        source_transform: maps a batch of inputs in the target's format to the source's (instead of the automatic
            resizing and normalisation).
        source_processor: image processor or tokenizer for raw data fed to the source (default: a timm model's
            data config, or the one saved with its ``name_or_path``); ``target_processor`` likewise.
        image_column: column of the images in ``datasets`` rows; ``label_column`` and ``text_column`` likewise.

    Returns:
        The patch; ``patch.attach(target)`` adds the cloned classes after the target's own.
    """
    config = config or CloneConfig()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        run = _checked_run(
            source,
            target,
            data,
            classes,
            replay,
            config,
            torch.Generator().manual_seed(seed),
            progress,
            source_transform,
            (source_processor, target_processor),
            (image_column, label_column, text_column),
        )
        metrics: dict[str, Any] = {"clone_examples": len(run.examples), "cloned_classes": len(run.classes)}
        metrics["clone_examples_used"] = _keep_per_class(run)
        seconds: dict[str, float] = {}
        for stage in (prepare, search, check_gates, localize_branch, train):
            begun = time.perf_counter()
            with run.autocast() if stage not in (prepare, check_gates) else contextlib.nullcontext():
                metrics.update(stage(run))
            seconds[stage.__name__] = round(time.perf_counter() - begun, 2)
        begun = time.perf_counter()
        patch = _build(run)
        metrics.update(fit_gate(run, patch))
        seconds["fit_gate"] = round(time.perf_counter() - begun, 2)
    metrics["stage_seconds"] = seconds
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
    user_source_transform: Callable[[ModelInputs], ModelInputs] | None,
    processors: tuple[Any, Any],
    columns: tuple[str, str, str],
) -> CloneRun:
    """Check models, data, classes and replay against each other; the run state every stage starts from."""
    for role, model in (("source", source), ("target", target)):
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"{role} must be a torch.nn.Module classifier, got {type(model).__name__}")
    source_backend, target_backend = backend_for(source), backend_for(target)
    names, (source_processor, target_processor) = source_backend.class_names(source), processors
    if is_raw(data) and user_source_transform is not None:
        raise InvalidInputError("source_transform maps tensors; with raw data pass source_processor= instead")
    if is_raw(data):
        data = encode(
            data,
            target,
            source,
            target_processor=target_processor,
            source_processor=source_processor,
            columns=columns,
            names=names,
        )
    examples = collect(data, "data")
    head = examples.select(torch.arange(min(2, len(examples))))
    sample = head.inputs
    check_target_input(target, target_backend, sample)
    source_head = head.for_source().inputs  # the source's own inputs (raw data) or the target's
    stats = (
        source_backend.normalization(source) if examples.source is not None else target_backend.normalization(target)
    )
    transform = source_transform(source, source_backend, source_head, stats, user_source_transform, labelled=examples)
    source_sample = source_backend.call_inputs(
        source, to_device(transform(source_head) if transform else source_head, model_device(source))
    )
    assert examples.labels is not None
    chosen = select_classes(
        examples.labels,
        classes,
        _num_classes(source, source_backend, source_sample),
        source_backend.class_names(source),
    )
    wanted = torch.isin(examples.labels, torch.tensor(chosen))
    if not bool(wanted.all()):  # a copy of the data only when some examples are of other classes
        examples = examples.select(wanted.nonzero().flatten())
    assert examples.labels is not None
    local_labels = torch.tensor([chosen.index(int(y)) for y in examples.labels])
    if is_raw(replay):
        replay = encode(
            replay,
            target,
            target_processor=target_processor,
            columns=columns,
            names=names,
            what="replay",
            labelled=False,
        )
    replay_examples = collect(replay, "replay", labelled=False) if replay is not None else None
    if replay_examples is not None:
        check_replay(replay_examples, examples, target, target_backend)
    return CloneRun(
        source,
        target,
        source_backend,
        target_backend,
        examples,
        local_labels,
        chosen,
        replay_examples,
        transform,
        source_sample,
        target_backend.call_inputs(target, to_device(sample, model_device(target))),
        config,
        generator,
        progress,
    )


def _keep_per_class(run: CloneRun) -> int:
    """Keep at most ``images_per_class`` examples of each class (the config's, else the budget's), a seeded sample
    in the data's order; the number of examples kept."""
    limit = run.config.images_per_class or run.budget.images_per_class
    counts = torch.bincount(run.labels)
    if limit is None or int(counts.max()) <= limit:
        return len(run.labels)
    kept = []
    for value in range(len(counts)):
        index = (run.labels == value).nonzero().flatten()
        kept.append(index[torch.randperm(len(index), generator=run.generator)[:limit]])
    index = torch.cat(kept).sort().values
    run.examples, run.labels = run.examples.select(index), run.labels[index]
    logger.info("kept %d of the clone data's examples (at most %d per class)", len(index), limit)
    return len(index)


def _num_classes(model: nn.Module, backend: Backend, inputs: ModelInputs) -> int:
    count = backend.num_classes(model)
    if count is None:
        with eval_mode(model):
            count = int(trace_model(model, inputs, backend).logits.shape[-1])
    return count


def _pairs(run: CloneRun) -> tuple[list[tuple[Point, Point]], list[str]]:
    """The (cut, insertion) pairs to search, the config's forced points or both models' spread candidates, cut
    down to what ``memory_gb`` holds; and why each point or pair left out was left out.

    Raises:
        InvalidInputError: not even one pair fits the budget (the message says what it would need).
    """
    config, source_size, target_size = run.config, image_size(run.source_sample), image_size(run.target_sample)
    source_points, tails = _with_blocks_after(
        run.source, run.source_backend, find_points(run.source, run.source_sample), run.source_sample
    )
    target_points = find_points(run.target, run.target_sample)
    if config.cut or config.insertion or config.search_positions:
        cut_pool = [_named(source_points, config.cut, "source")] if config.cut else source_points
        insertion_pool = [_named(target_points, config.insertion, "target")] if config.insertion else target_points
    else:
        cut_pool, insertion_pool = [_last_stage(source_points)], [_last_stage(target_points)]
    memory = _Memory(config, len(run.examples), tails, source_size, target_size)
    cuts = spread_points(memory.affordable(cut_pool, "source"), config.max_cuts)
    insertions = spread_points(memory.affordable(insertion_pool, "target"), config.max_insertions)
    pairs = memory.startable(_compatible(cuts, insertions, source_size, target_size))
    while pairs and not memory.fits(pairs):
        pairs = memory.without_costliest(pairs)
    return pairs or memory.cheapest(_compatible(cut_pool, insertion_pool, source_size, target_size)), memory.skipped


def _compatible(
    cuts: Sequence[Point],
    insertions: Sequence[Point],
    source_size: tuple[int, int] | None,
    target_size: tuple[int, int] | None,
) -> list[tuple[Point, Point]]:
    """The pairs an adapter can join (both image features or both text), without those whose insertion grid is
    coarser than the cut's unless no other pair is left."""
    pairs = [
        (c, p)
        for c in cuts
        for p in insertions
        if (feature_spec(c, source_size).grid is None) == (feature_spec(p, target_size).grid is None)
    ]
    if not pairs:
        raise UnsupportedModelError(
            "no (cut, insertion) pair is compatible: one model works on images and the other on text"
        )
    detailed = [(c, p) for c, p in pairs if not _coarser(feature_spec(p, target_size), feature_spec(c, source_size))]
    return detailed or pairs


def _coarser(insertion: FeatureSpec, cut: FeatureSpec) -> bool:
    """Whether the insertion's grid is coarser than the cut's: an adapter cannot invent the spatial detail the branch
    expects (a pooled 1x1 feature stretched to a 4x4 grid is the same vector everywhere), so such pairs are searched
    only when no other pair is compatible."""
    if insertion.grid is None or cut.grid is None:
        return False
    return insertion.grid[0] < cut.grid[0] or insertion.grid[1] < cut.grid[1]


def prepare(run: CloneRun) -> dict[str, Any]:
    """Features at every candidate point (once), the held-out split, and an adapter started by least squares
    for every compatible (cut, insertion) pair."""
    config = run.config
    pairs, skipped = _pairs(run)
    cuts, insertions = {c.name: c for c, _ in pairs}, {p.name: p for _, p in pairs}
    run.target_features, _ = _extract(
        run.target,
        sorted(insertions),
        run.examples,
        config.feature_batch_size,
        None,
        "pnc: target features",
        run.progress,
        backend=run.target_backend,
        store=run.device,
        precision=run.precision,
    )
    run.source_features, source_logits = _extract(
        run.source,
        sorted(cuts),
        run.examples.for_source(),
        config.feature_batch_size,
        run.source_input,
        "pnc: source features",
        run.progress,
        backend=run.source_backend,
        store=run.device,
        precision=run.precision,
    )
    run.teacher = source_logits[:, run.classes]
    inputs = run.examples.inputs
    run.context = {k: v.to(run.device) for k, v in _branch_context(inputs).items()}
    run.fit_index, run.held_index = _stratified_split(run.labels, config.heldout_fraction, run.generator)
    if len(run.held_index) == 0:
        run.held_index = run.fit_index

    branches: dict[str, Branch] = {}
    for cut in tqdm(cuts.values(), desc="pnc: cut the source", disable=not run.progress, leave=False):
        branch = Branch.from_model(run.source, cut, run.source_sample)
        branch.keep_classes(run.classes)
        for parameter in branch.parameters():
            parameter.requires_grad_(False)
        branches[cut.name] = branch
    source_size, target_size = image_size(run.source_sample), image_size(run.target_sample)
    costs = _branch_costs(run, branches)
    run.candidates = [
        Candidate(
            c,
            p,
            branches[c.name],
            Adapter(feature_spec(p, target_size), feature_spec(c, source_size), config.adapter_hidden).to(run.device),
            cost=costs[c.name],
            cost_weight=config.cost_weight,
        )
        for c, p in pairs
    ]
    working = WORKING_SHARE * config.memory_gb * 2**30 / 2  # half for the sampled rows, half for the solver's chunks
    for candidate in run.candidates:
        sample = _least_squares_rows(run.fit_index, candidate.adapter, run.generator, working)
        candidate.adapter.fit_least_squares(
            run.target_features[candidate.insertion.name][sample],
            run.source_features[candidate.cut.name][sample],
            max_bytes=int(working),
        )
    return {
        "source_local_accuracy": round(float((run.teacher.argmax(-1).cpu() == run.labels).float().mean()), 4),
        "memory_skipped": len(skipped),
    }


def _branch_context(inputs: ModelInputs) -> dict[str, torch.Tensor]:
    """The inputs a branch may read besides the feature: the attention mask and the token ids (which a branch cut
    where the rest of the source reads them takes, :attr:`Point.reads_input`); each branch keeps its own keys."""
    if not isinstance(inputs, dict):
        return {}
    return {k: v for k, v in inputs.items() if k == "attention_mask" or not v.is_floating_point()}


def _flops(model: nn.Module, *args: Any, **kwargs: Any) -> float:
    """Floating-point operations of one call of ``model``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return float(counter.get_total_flops())


def _branch_costs(run: CloneRun, branches: dict[str, Branch]) -> dict[str, float]:
    """Each cut's cost: the mean of its branch's share of the source's parameters and of its FLOPs per example."""
    source_params = sum(p.numel() for p in run.source.parameters())
    sample = (
        {k: v[:1] for k, v in run.source_sample.items()}
        if isinstance(run.source_sample, Mapping)
        else run.source_sample[:1]
    )
    with eval_mode(run.source):
        source_flops = _flops(run.source, **sample) if isinstance(sample, dict) else _flops(run.source, sample)
    costs = {}
    for name, branch in branches.items():
        feature = run.source_features[name][:1].to(run.device)
        context = {k: v[:1].to(run.device) for k, v in run.context.items()}
        param_share = branch_parameters(branch) / max(source_params, 1)
        flop_share = _flops(branch, feature, **context) / source_flops if source_flops > 0 else param_share
        costs[name] = min(1.0, (param_share + flop_share) / 2)
    return costs


def search(run: CloneRun) -> dict[str, Any]:
    """The winning (cut, insertion) pair by successive halving, and the ranking of all pairs."""
    assert run.fit_index is not None and run.held_index is not None, "prepare() first"
    fit_index, held_index = run.fit_index, run.held_index
    if len(run.candidates) > 1:
        run.winner, run.ranking = successive_halving(
            run.candidates,
            lambda c: run.rows(c, fit_index),
            lambda c: run.rows(c, held_index),
            first_steps=run.config.search_steps or run.budget.search_steps(len(fit_index), run.config.batch_size),
            survivors=run.budget.survivors,
            generator=run.generator,
            progress=run.progress,
            **run.train_kwargs(),
        )
    else:
        run.winner, run.ranking = run.candidates[0], [run.candidates[0].record()]
    return {"cut": run.winner.cut.name, "insertion": run.winner.insertion.name, "pairs_searched": len(run.candidates)}


GATE_CHECK_ROWS = 256
"""Clone examples (a stratified sample) each finalist's trial gate is fitted on: its out-of-fold pass rate is then
good to a few points, and checking three finalists costs less than one gate fitted on every example."""


def check_gates(run: CloneRun) -> dict[str, Any]:
    """Among the search's finalists, the pair whose cloned inputs would come through best: its held-out local
    accuracy times the share of clone inputs a trial gate lets through at the budget (out of fold).

    The search scores what the branch gets right, but a cloned input counts only if the gate passes it, and how
    well a gate tells cloned from target-domain inputs depends on the pair: a branch fed from the target's last
    features sees the input as the target saw it, one fed from early features much as the source does
    (``benchmarks.pair_matrix``, mobilenetv3 -> hf_vit_small: 70% of cloned inputs passed with the insertion at the
    target's final norm, 97% with it after the first block, the branch right on 96-99% of them either way). The
    finalists are the search's winner and the best pair of every insertion point (by rounds reached, then score,
    which may be a costlier cut than the winner's); the winner stays unless another is better by more than the
    held-out set's noise. The trial gates are of the patch's kind (``"novelty"`` for ``gate="auto"``, without its
    alternatives). Runs with replay data and a discriminant gate only (without replay data no gate can be judged),
    and not with ``budget="fast"``.
    """
    assert run.winner is not None and run.held_index is not None, "search() first"
    if not run.budget.check_gates or run.replay is None or _gate_kind(run) not in DISCRIMINANT_KINDS:
        return {}
    best: dict[str, Candidate] = {}
    for candidate in sorted(run.candidates, key=lambda c: (c.rounds, c.score), reverse=True):
        best.setdefault(candidate.insertion.name, candidate)
    finalists = [run.winner, *(c for c in best.values() if c is not run.winner)]
    if len(finalists) < 2:
        return {}
    generator = torch.Generator().manual_seed(run.generator.initial_seed())  # leaves the run's stream as it was
    rows = torch.arange(len(run.labels))
    if len(rows) > GATE_CHECK_ROWS:
        rows = _stratified_split(run.labels, GATE_CHECK_ROWS / len(rows), generator)[1]
    seed = int(torch.randint(2**31, (), generator=generator))
    fitted = _fit_gates(run, [_build(run, c) for c in finalists], rows, seed, ())
    for candidate in finalists:  # _build moved the shared modules to the CPU, where gates are fitted
        candidate.branch.to(run.device)
        candidate.adapter.to(run.device)
    checked = [(c, f["gate_positive_rate_heldout"]) for c, f in zip(finalists, fitted)]
    expected = [c.accuracy * passed for c, passed in checked]
    choice = max(range(len(checked)), key=lambda i: expected[i])
    if expected[choice] > expected[0] + standard_error(expected[0], len(run.held_index)):
        run.winner = checked[choice][0]
        record = run.winner.record()
        run.ranking = [record, *(r for r in run.ranking if r != record)]
    return {
        "gate_check": [{**c.record(), "gate_pass_rate": round(passed, 4)} for c, passed in checked],
        "cut": run.winner.cut.name,
        "insertion": run.winner.insertion.name,
    }


def localize_branch(run: CloneRun) -> dict[str, Any]:
    """Prune the winner's branch in place to what the cloned classes need (:func:`pnc_surgery.localize.localize`)."""
    assert run.winner is not None, "search() first"
    config, branch, share = run.config, run.winner.branch, _branch_share(run)
    full_params = branch_parameters(branch)
    cut_features = run.source_features[run.winner.cut.name]
    device = run.device
    rows = torch.arange(len(run.labels))
    if len(rows) > LOCALIZE_EXAMPLES:
        rows = _stratified_split(run.labels, LOCALIZE_EXAMPLES / len(rows), run.generator)[1]
    data = [  # one batch each
        (
            cut_features[index].to(device),
            run.labels[index].to(device),
            {k: v[index].to(device) for k, v in run.context.items()},
        )
        for index in rows.split(config.batch_size)
    ]
    if config.localize:
        ratio, metrics = localize(
            branch,
            data,
            keep_ratio=config.keep_ratio,
            keep_ratios=config.keep_ratios,
            tolerance=config.accuracy_tolerance,
            max_parameters=None if share is None else int(share * sum(p.numel() for p in run.source.parameters())),
            progress=run.progress,
        )
        metrics["max_branch_share"] = share
    else:
        ratio, metrics = 1.0, {"branch_local_accuracy": round(local_accuracy(branch, data), 4)}
    metrics.update(
        kept_ratio=round(branch_parameters(branch) / max(full_params, 1), 4),
        branch_parameters=branch_parameters(branch),
        unpruned_branch_parameters=full_params,
        prune_keep_ratio=ratio,
    )
    return metrics


def _branch_share(run: CloneRun) -> float | None:
    """The branch budget localization applies: the configured one, or for ``"auto"`` the data's (see
    :data:`AUTO_BUDGET_EXAMPLES`)."""
    share = run.config.max_branch_share
    if not isinstance(share, str):
        return share
    fewest = int(torch.bincount(run.labels).min())
    return AUTO_BRANCH_SHARE if fewest >= AUTO_BUDGET_EXAMPLES else None


def train(run: CloneRun) -> dict[str, Any]:
    """The final training of the winner's adapter (and, with ``finetune_branch``, its branch)."""
    assert run.winner is not None and run.fit_index is not None and run.held_index is not None, "search() first"
    config, winner = run.config, run.winner
    steps = config.train_steps or run.budget.train_steps(len(run.fit_index), config.batch_size)
    before = winner.steps
    heldout = run.rows(winner, run.held_index)
    with tqdm(total=steps, desc="pnc: train adapter + branch", disable=not run.progress, leave=False) as bar:
        train_candidate(
            winner,
            run.rows(winner, run.fit_index),
            steps,
            generator=run.generator,
            progress=bar.update,
            branch_lr=config.branch_lr if config.finetune_branch else 0.0,
            heldout=heldout,
            eval_every=max(_steps(1, len(run.fit_index), config.batch_size, None), MIN_EVAL_STEPS),
            patience=run.budget.patience,
            **run.train_kwargs(),
        )
    accuracy, _ = evaluate(winner, heldout, config.temperature, config.feature_weight)
    return {"heldout_local_accuracy": round(accuracy, 4), "train_steps": winner.steps - before}


def _build(run: CloneRun, candidate: Candidate | None = None) -> Patch:
    """The winner (or ``candidate``) as a patch with an unfitted gate of the configured kind, sharing its modules."""
    assert run.winner is not None, "search() first"
    config, winner = run.config, candidate or run.winner
    patch = Patch.from_parts(
        run.source,
        run.target,
        winner.cut,
        winner.insertion,
        winner.branch,
        winner.adapter,
        _gate_kind(run),
        target_input=run.target_sample,
        source_kwargs=config.source_kwargs or None,
    )
    return patch.to("cpu").eval()  # the gate is fitted on the CPU; attaching moves the patch to the target's device


def _gate_kind(run: CloneRun) -> str:
    """The kind of gate the patch gets: the configured one, or for ``"auto"`` the one its data allows."""
    if run.config.gate != "auto":
        return run.config.gate
    return "novelty" if run.replay is not None else "energy"


def fit_gate(run: CloneRun, patch: Patch) -> dict[str, Any]:
    """Fit ``patch``'s gate on the clone data (positives) and the replay data (negatives, when given)."""
    seed = int(torch.randint(2**31, (), generator=run.generator))
    also_try = AUTO_ALTERNATIVES if run.config.gate == "auto" else ()
    return _fit_gates(run, [patch], None, seed, also_try)[0]


def _fit_gates(
    run: CloneRun, patches: Sequence[Patch], rows: torch.Tensor | None, seed: int, also_try: Sequence[str]
) -> list[dict[str, Any]]:
    """Fit each patch's gate on the clone data (positives; only ``rows`` of it when given) and the replay data
    (negatives, when given), the target run once over each for all patches."""
    config, replay = run.config, run.replay
    examples, labels = (run.examples, run.labels) if rows is None else (run.examples.select(rows), run.labels[rows])
    positives = _evidence(patches, run.target, examples, config, run.progress)
    negatives: list[GateInputs | None] = [None] * len(patches)
    negative_groups = negative_sources = None
    if replay is not None:
        replay, negative_sources = with_shifted_copies(replay) if config.shift_replay else (replay, None)
        replay_rows = _evidence(patches, run.target, replay, config, run.progress)
        replay_logits = replay_rows[0].target_logits
        negatives = list(replay_rows)
        labels_given = replay.labels is not None and bool(
            ((replay.labels >= 0) & (replay.labels < replay_logits.shape[1])).all()
        )
        negative_groups = replay.labels if labels_given else replay_logits.argmax(-1)
    return [
        patch.gate.fit(
            seen,
            labels,
            unseen,
            negative_groups,
            negative_sources=negative_sources,
            max_false_positive_rate=config.max_false_positive_rate,
            seed=seed,
            also_try=also_try,
        )
        for patch, seen, unseen in zip(patches, positives, negatives)
    ]


def package(run: CloneRun, patch: Patch, metrics: dict[str, Any]) -> Patch:
    """Record the run on ``patch``: its metrics, the search ranking and the configuration it ran with.

    Raises:
        CloneError: a tensor of the patch is not finite (the training diverged); nothing is returned.
    """
    broken = [
        name
        for name, tensor in {**dict(patch.named_parameters()), **dict(patch.named_buffers())}.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if broken:
        raise CloneError(
            f"the clone diverged: {len(broken)} tensors of the patch hold NaN or infinite values ({short(broken, 3)}); "
            "lower lr / branch_lr or check the data's scale"
        )
    patch.update_config(search=tuple(run.ranking))
    patch.metrics.update(metrics)
    patch.update_config(
        clone_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(run.config).items()}
    )
    return patch


@torch.no_grad()
def _evidence(
    patches: Sequence[Patch], target: nn.Module, examples: Examples, config: CloneConfig, progress: bool
) -> list[GateInputs]:
    """What the gate of each patch, attached alone, would see for ``examples``: one pass of the target, one batch
    at a time (the insertion features of all examples are never held at once)."""
    insertions = list(dict.fromkeys(patch.config.insertion.name for patch in patches))
    context = _branch_context(examples.inputs)
    rows: list[list[GateInputs]] = [[] for _ in patches]
    done = 0
    for features, logits, pre_logits in _extracted_batches(
        target,
        insertions,
        examples,
        config.feature_batch_size,
        None,
        "pnc: gate evidence",
        progress,
        list(patches[0].config.target.classifiers),
    ):
        logits = logits.float().cpu()
        pre_logits = logits.new_zeros(len(logits), 0) if pre_logits is None else pre_logits.float().cpu()
        batch_context = {k: v[done : done + len(logits)] for k, v in context.items()}
        for patch, seen in zip(patches, rows):
            feature = features[patch.config.insertion.name].float().cpu()
            seen.append(patch_gate_inputs(patch, feature, logits, pre_logits, **batch_context))
        done += len(logits)
    return [GateInputs.cat(seen) for seen in rows]


def _named(points: Sequence[Point], name: str, role: str) -> Point:
    for point in points:
        if point.name == name:
            return point
    raise InvalidInputError(f"{name!r} is not a {role} point; points: {[p.name for p in points]}")
