"""The gate: how much the cloned classes' scores compete with the target's own.

The patched model returns the target's logits ``t`` unchanged, followed by ``z`` for the cloned classes::

    z = logsumexp(t) + g(x) + log_softmax(b)

where ``b`` are the branch's logits and ``g(x)`` is the gate's log-odds that ``x`` belongs to a cloned class.
A softmax over ``[t, z]`` then gives the target's own distribution scaled by ``1 - sigmoid(g)`` and the
branch's scaled by ``sigmoid(g)``: where the gate says "not a cloned class", the target's answer stands
(locality).

``g`` is a discriminant over features ``f`` of the gate's inputs (:class:`~pnc_surgery.evidence.GateInputs`): one
Gaussian component per cloned class (from the clone data) and one per target class seen in the replay data,
sharing one shrunk covariance::

    g(x) = logsumexp_k(w_k . f + c_k) - logsumexp_a(w_a . f + c_a)

The kinds differ in ``f``:

* ``"novelty"``: in the target's pre-logit space, in the branch's (the source's own features of the cloned
  classes) and in the target's pooled feature at the insertion point, the log squared Mahalanobis distance to
  the nearest cloned class and to the nearest target class, under one shrunk covariance per space. Target-domain
  inputs lie on every side of the cloned classes' clusters, which no linear function of the features themselves
  separates; distances to the clusters do. Six numbers a discriminant fits well from a hundred replay inputs.
* ``"learned"``: the logits, energies and confidences of both models and the target's pre-logits themselves.
  With replay data, ``clone`` fits both and keeps the one that passes more held-out clone inputs at the budget
  (:data:`AUTO_ALTERNATIVES`).
* ``"energy"``: without replay data, a one-class threshold on the energy gap between branch and target.
* ``"none"``: the branch's raw logits compete as they are (the no-gate ablation).

The threshold is the ``1 - CALIBRATION * max_false_positive_rate`` quantile of the out-of-fold replay margins,
extrapolated from their tail (see :func:`_tail_quantile`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import InvalidInputError
from .evidence import GateInputs

__all__ = [
    "AUTO_ALTERNATIVES",
    "CALIBRATION",
    "DISCRIMINANT_KINDS",
    "GATE_KINDS",
    "NOVELTY_RANK",
    "SPACES",
    "Gate",
    "NoveltySpace",
    "evidence_width",
    "gate_evidence",
]

GATE_KINDS = ("novelty", "learned", "energy", "none")
DISCRIMINANT_KINDS = ("novelty", "learned")
"""The kinds fitted against replay data (a discriminant thresholded on out-of-fold replay margins)."""
AUTO_ALTERNATIVES = ("learned",)
"""Kinds ``clone(config=CloneConfig(gate="auto"))`` also fits beside ``"novelty"``, keeping the better (see
:meth:`Gate.fit`'s ``also_try``): neither kind of feature separates best on every pair of models."""
CALIBRATION = 0.5
"""The gate aims at this share of its false-positive budget: a tail quantile estimated from a hundred replay inputs
misses by a factor of two either way in single fits, and the budget is a bound, not a target."""
SPACES = ("pre_logits", "branch_features", "insertion_features")
"""The :class:`GateInputs` feature spaces in which a ``"novelty"`` gate measures distances."""
NOVELTY_RANK = 128
"""A novelty space wider than this keeps its covariance's leading directions (this many) and one variance for all
the others (probabilistic PCA): a full precision matrix grows with the width squared, 4.2M numbers for a 2048-wide
space (a ResNet-50's pre-logits: 0.16x the whole model, and a gate has up to three spaces)."""


SUBSPACE_ITERATIONS = 6
"""Rounds of subspace iteration that find a wide space's leading directions."""


class NoveltySpace(NamedTuple):
    """One novelty space: its Gaussian components' means and their shared precision, either full (``precision``:
    width x width) or, for a space wider than :data:`NOVELTY_RANK`, in the covariance's leading directions
    (``basis``: width x rank, orthonormal; ``precision``: the rank precisions along them) with one precision
    ``rest`` (shape ``(1,)``) for every direction outside them."""

    means: torch.Tensor
    precision: torch.Tensor
    basis: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """The number of leading directions kept; 0 for a full precision matrix."""
        return 0 if self.basis is None else int(self.basis.shape[1])

    @classmethod
    def empty(cls, width: int, rank: int, num_components: int) -> NoveltySpace:
        """Zeros of the shapes a space of ``width`` and ``rank`` (0: full) has, to load a patch's tensors into."""
        if not rank:
            return cls(torch.zeros(num_components, width), torch.zeros(width, width))
        return cls(torch.zeros(num_components, width), torch.zeros(rank), torch.zeros(width, rank), torch.zeros(1))

    def squared_distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row of ``x`` to each component's mean (rows x components)."""
        if self.basis is None:
            return _quadratic(x, self.means, lambda v: v @ self.precision)
        assert self.rest is not None, "a space with a basis has a rest precision"
        inside_x, inside_m = x @ self.basis, self.means @ self.basis
        inside = _quadratic(inside_x, inside_m, lambda v: v * self.precision)
        outside_x, outside_m = x - inside_x @ self.basis.T, self.means - inside_m @ self.basis.T
        return inside + self.rest * _quadratic(outside_x, outside_m, lambda v: v)


def _quadratic(
    x: torch.Tensor, means: torch.Tensor, times_precision: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``(x_i - m_j) P (x_i - m_j)`` for every row and mean, with ``times_precision(v) = v P`` (P symmetric)."""
    projected = times_precision(x)
    return (projected * x).sum(-1, keepdim=True) - 2 * projected @ means.T + (times_precision(means) * means).sum(-1)


def gate_evidence(target_logits: torch.Tensor, branch_logits: torch.Tensor, pre_logits: torch.Tensor) -> torch.Tensor:
    """The ``"learned"`` and ``"energy"`` gates' features, one row per example: energies, confidences, logits and
    the target's pre-logits (the input of its classifier)."""
    target_logits, branch_logits = target_logits.float(), branch_logits.float()
    energy_t, energy_b = target_logits.logsumexp(-1, keepdim=True), branch_logits.logsumexp(-1, keepdim=True)
    confidence_t = target_logits.softmax(-1).amax(-1, keepdim=True)
    confidence_b = branch_logits.softmax(-1).amax(-1, keepdim=True)
    return torch.cat(
        [
            energy_b - energy_t,
            energy_t,
            energy_b,
            confidence_t,
            confidence_b,
            target_logits,
            branch_logits,
            pre_logits.float(),
        ],
        dim=-1,
    )


def evidence_width(num_old: int, num_new: int, pre_logits: int) -> int:
    """Length of a :func:`gate_evidence` row."""
    return 5 + num_old + num_new + pre_logits


class Gate(nn.Module):
    """Log-odds that an input belongs to a cloned class, and the combined logits.

    Args:
        kind: one of :data:`GATE_KINDS` (see the module docstring).
        num_features: length of the discriminant's feature rows (:func:`evidence_width` for ``"learned"`` and
            ``"energy"``, two per used space for ``"novelty"``).
        num_components: rows of ``weight``: linear scores whose logsumexps are compared (the discriminant's
            Gaussian components; the energy gate's gap and a constant zero).
        num_positive: how many of them, first, stand for the cloned classes.
        shrinkage: how far the discriminant's covariance is pulled towards a scaled identity when fitting, in
            [0, 1] (a novelty space's covariance takes the Ledoit-Wolf amount of its own data).
        space_widths: for ``"novelty"``, the width of each of :data:`SPACES` (0: the space is not used).
        space_ranks: for ``"novelty"``, how many leading directions each space keeps (0: a full precision matrix;
            see :class:`NoveltySpace`).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        kind: str,
        num_features: int,
        num_components: int = 2,
        num_positive: int = 1,
        shrinkage: float = 0.1,
        space_widths: tuple[int, ...] = (0,) * len(SPACES),
        space_ranks: tuple[int, ...] = (0,) * len(SPACES),
    ) -> None:
        super().__init__()
        if kind not in GATE_KINDS:
            raise InvalidInputError(f"gate kind must be one of {GATE_KINDS}, got {kind!r}")
        if not 0 < num_positive < num_components:
            raise InvalidInputError(
                f"a gate needs cloned-class and target components, got {num_positive} of {num_components}"
            )
        if len(space_widths) != len(SPACES) or min(space_widths) < 0:
            raise InvalidInputError(f"space_widths must be {len(SPACES)} non-negative widths, got {space_widths}")
        if len(space_ranks) != len(SPACES) or any(not 0 <= r < max(w, 1) for r, w in zip(space_ranks, space_widths)):
            raise InvalidInputError(f"space_ranks must be {len(SPACES)} ranks below their widths, got {space_ranks}")
        self.kind = kind
        self.num_positive = num_positive
        self.shrinkage = shrinkage
        self.weight = nn.Parameter(torch.zeros(num_components, num_features))
        self.bias = nn.Parameter(torch.zeros(num_components))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        if kind == "novelty":
            self._set_spaces(
                {
                    space: NoveltySpace.empty(width, rank, num_components)
                    for space, width, rank in zip(SPACES, space_widths, space_ranks)
                    if width
                }
            )

    @classmethod
    def unfitted(cls, kind: str, num_old: int, num_new: int, pre_logits_width: int) -> Gate:
        """A gate of ``kind`` for a target with ``num_old`` classes and pre-logits of ``pre_logits_width``, and
        ``num_new`` cloned classes, to be fitted (:meth:`fit`) before use."""
        return cls(kind, 0 if kind == "novelty" else evidence_width(num_old, num_new, pre_logits_width))

    @property
    def num_components(self) -> int:
        return self.weight.shape[0]

    @property
    def space_widths(self) -> tuple[int, ...]:
        """Width of each of :data:`SPACES` a ``"novelty"`` gate measures distances in (0: unused)."""
        spaces = self.spaces()
        return tuple(int(spaces[space].means.shape[1]) if space in spaces else 0 for space in SPACES)

    @property
    def space_ranks(self) -> tuple[int, ...]:
        """Leading directions each of :data:`SPACES` keeps (0: a full precision matrix, or unused)."""
        spaces = self.spaces()
        return tuple(spaces[space].rank if space in spaces else 0 for space in SPACES)

    def spaces(self) -> dict[str, NoveltySpace]:
        """A ``"novelty"`` gate's fitted spaces, by name (empty for the other kinds)."""
        return {
            space: NoveltySpace(
                self.get_buffer(f"{space}_means"),
                self.get_buffer(f"{space}_precision"),
                self._buffers.get(f"{space}_basis"),
                self._buffers.get(f"{space}_rest"),
            )
            for space in SPACES
            if f"{space}_means" in self._buffers
        }

    def spec(self) -> dict[str, Any]:
        """What a patch file records to rebuild the gate (:meth:`from_spec`)."""
        spec = {
            "kind": self.kind,
            "num_features": int(self.weight.shape[1]),
            "num_components": self.num_components,
            "num_positive": self.num_positive,
        }
        if self.kind == "novelty":
            spec["space_widths"] = list(self.space_widths)
            if any(self.space_ranks):
                spec["space_ranks"] = list(self.space_ranks)
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Gate:
        """An unfitted gate of the recorded kind and sizes (the patch's tensors are loaded into it); ``spec`` was
        validated by :class:`pnc_surgery.patch.config.GateSpec`."""
        widths = spec.get("space_widths", [0] * len(SPACES))
        return cls(
            str(spec.get("kind")),
            spec["num_features"],
            spec["num_components"],
            spec["num_positive"],
            space_widths=tuple(widths),
            space_ranks=tuple(spec.get("space_ranks", [0] * len(SPACES))),
        )

    def features(self, inputs: GateInputs) -> torch.Tensor:
        """The discriminant's feature rows for a batch of gate inputs."""
        if self.kind != "novelty":
            return gate_evidence(inputs.target_logits, inputs.branch_logits, inputs.pre_logits)
        return _space_features(self.spaces(), inputs, self.num_positive)

    def log_odds(self, inputs: GateInputs) -> torch.Tensor:
        """``g(x)`` per input."""
        return _log_odds(
            self.features(inputs).to(self.mean.dtype), self.weight, self.bias, self.num_positive, self.mean, self.std
        )

    def forward(
        self,
        target_logits: torch.Tensor,
        branch_logits: torch.Tensor,
        pre_logits: torch.Tensor,
        branch_features: torch.Tensor,
        insertion_features: torch.Tensor,
    ) -> torch.Tensor:
        """Logits of the cloned classes, on the target's scale (see the module docstring)."""
        if self.kind == "none":
            return branch_logits.to(target_logits.dtype)
        g = self.log_odds(GateInputs(target_logits, branch_logits, pre_logits, branch_features, insertion_features))
        z = (
            target_logits.float().logsumexp(-1, keepdim=True)
            + g.float().unsqueeze(-1)
            + branch_logits.float().log_softmax(-1)
        )
        return z.to(target_logits.dtype)

    @torch.no_grad()
    def fit(
        self,
        positives: GateInputs,
        positive_groups: torch.Tensor,
        negatives: GateInputs | None = None,
        negative_groups: torch.Tensor | None = None,
        *,
        negative_sources: torch.Tensor | None = None,
        max_false_positive_rate: float = 0.01,
        folds: int = 5,
        seed: int = 0,
        also_try: Sequence[str] = (),
    ) -> dict:
        """Fit ``g`` on the gate inputs of cloned-class inputs and (optionally) target-domain inputs.

        Args:
            positives: gate inputs of the clone data; ``positive_groups`` their cloned class (0, 1, ...).
            negatives: gate inputs of replay inputs; ``negative_groups`` their target class (labels where the
                replay data has them, else the target's predictions).
            negative_sources: which replay input each negative row comes from (augmented copies share one), so
                that no out-of-fold score comes from a model that saw a copy of its input.
            max_false_positive_rate: share of target-domain inputs a cloned class may take.
            folds: out-of-fold rounds that score the replay inputs for the threshold.
            also_try: other kinds to fit on the same data; the gate becomes whichever lets the most held-out
                clone inputs through at the budget (out of fold; ties keep this gate's kind).

        Returns:
            What the fit saw: the method used and the rates on the data it had (``gate_candidates``: each tried
            kind's out-of-fold pass rate).
        """
        fit_kwargs: dict[str, Any] = {
            "negative_sources": negative_sources,
            "max_false_positive_rate": max_false_positive_rate,
            "folds": folds,
            "seed": seed,
        }
        metrics = self._fit(positives, positive_groups, negatives, negative_groups, **fit_kwargs)
        if not also_try or self.kind not in DISCRIMINANT_KINDS:
            return metrics
        candidates = {self.kind: metrics["gate_positive_rate_heldout"]}
        for kind in also_try:
            other = Gate(kind, 0, shrinkage=self.shrinkage)
            other_metrics = other._fit(positives, positive_groups, negatives, negative_groups, **fit_kwargs)
            if other.kind in DISCRIMINANT_KINDS and other.kind not in candidates:
                candidates[other.kind] = other_metrics["gate_positive_rate_heldout"]
                if candidates[other.kind] > candidates[self.kind]:
                    self._adopt(other)
                    metrics = other_metrics
        return {**metrics, "gate_candidates": candidates}

    def _fit(
        self,
        positives: GateInputs,
        positive_groups: torch.Tensor,
        negatives: GateInputs | None,
        negative_groups: torch.Tensor | None,
        *,
        negative_sources: torch.Tensor | None,
        max_false_positive_rate: float,
        folds: int,
        seed: int,
    ) -> dict:
        """:meth:`fit` for this gate's kind alone."""
        if self.kind == "none":
            return {"gate": "none"}
        if negatives is not None and negative_sources is None:
            negative_sources = torch.arange(len(negatives.target_logits))
        if negative_groups is None and negatives is not None:
            negative_groups = torch.zeros(len(negatives.target_logits), dtype=torch.long)
        if self.kind == "novelty" and not any(getattr(positives, space).shape[1] for space in SPACES):
            self.kind = "learned"  # no features to measure distances in
        if self.kind in DISCRIMINANT_KINDS and (
            negatives is None or negative_sources is None or len(negative_sources.unique()) < folds
        ):
            self.kind = "energy"
        if self.kind != "novelty":
            self._set_spaces({})
        if self.kind == "energy":
            return self._fit_one_class(self.features(positives))
        assert negatives is not None and negative_sources is not None and negative_groups is not None, "negatives given"
        gen = torch.Generator().manual_seed(seed)
        pos_fold = torch.randperm(len(positive_groups), generator=gen) % folds
        sources, source_of = negative_sources.unique(return_inverse=True)
        neg_fold = (torch.randperm(len(sources), generator=gen) % folds)[source_of]  # copies of one input share a fold
        if self.kind == "novelty":
            pos_features, neg_features = self._fit_spaces(
                positives, positive_groups, negatives, negative_groups, pos_fold, neg_fold, folds
            )
        else:
            pos_features, neg_features = self.features(positives), self.features(negatives)
        metrics = self._fit_discriminant(
            pos_features,
            positive_groups,
            neg_features,
            negative_groups,
            pos_fold,
            neg_fold,
            folds,
            _confidence_gap(positives),
            _confidence_gap(negatives),
            max_false_positive_rate,
        )
        metrics["locality_protection"] = f"gate fitted against {len(sources)} replay inputs of the target's domain" + (
            f" ({len(negative_groups)} rows with their shifted copies)" if len(negative_groups) > len(sources) else ""
        )
        return metrics

    def _adopt(self, other: Gate) -> None:
        """Become the fitted gate ``other``."""
        self.kind = other.kind
        self._load(other.weight.data, other.bias.data, other.num_positive, other.mean, other.std)
        self._set_spaces(other.spaces())

    def _set_spaces(self, spaces: dict[str, NoveltySpace]) -> None:
        """Replace the novelty buffers: per space, the components' means and the precision (with its basis and rest
        precision where the space keeps leading directions only)."""
        for space in SPACES:
            for part in NoveltySpace._fields:
                self._buffers.pop(f"{space}_{part}", None)
        for space, fitted in spaces.items():
            for part, tensor in fitted._asdict().items():
                if tensor is not None:
                    self.register_buffer(f"{space}_{part}", tensor.float())

    def _load(
        self, weight: torch.Tensor, bias: torch.Tensor, num_positive: int, mean: torch.Tensor, std: torch.Tensor
    ) -> None:
        self.weight = nn.Parameter(weight.to(self.weight))
        self.bias = nn.Parameter(bias.to(self.bias))
        self.num_positive = num_positive
        self.mean = mean.to(self.mean)
        self.std = std.to(self.std)

    def _fit_one_class(self, positives: torch.Tensor) -> dict:
        """No target-domain data: accept where the branch is surer than the target, as on 97% of the clone data."""
        gap = positives[:, 0]
        spread = gap.std().clamp_min(1e-3)
        threshold = torch.quantile(gap, 0.03)
        weight = torch.zeros(2, positives.shape[1])
        weight[0, 0] = 4.0 / spread
        bias = torch.tensor([float(-4.0 * threshold / spread), 0.0])
        self._load(weight, bias, 1, torch.zeros(positives.shape[1]), torch.ones(positives.shape[1]))
        accepted = (_log_odds(positives, self.weight, self.bias, 1, self.mean, self.std) > 0).float().mean().item()
        return {
            "gate": "energy",
            "gate_positive_rate_clone": accepted,
            "locality_protection": "one-class threshold on the branch/target energy gap (no replay data)",
        }

    def _fit_spaces(
        self,
        positives: GateInputs,
        positive_groups: torch.Tensor,
        negatives: GateInputs,
        negative_groups: torch.Tensor,
        pos_fold: torch.Tensor,
        neg_fold: torch.Tensor,
        folds: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit the novelty spaces on all rows; return each row's distance features from spaces fitted without it."""
        used = [space for space in SPACES if getattr(positives, space).shape[1]]

        def spaces_of(p_rows: torch.Tensor, n_rows: torch.Tensor) -> dict[str, NoveltySpace]:
            return {
                space: _mahalanobis(
                    getattr(positives, space)[p_rows],
                    positive_groups[p_rows],
                    getattr(negatives, space)[n_rows],
                    negative_groups[n_rows],
                )
                for space in used
            }

        pos_features = torch.empty(len(positive_groups), 2 * len(used))
        neg_features = torch.empty(len(negative_groups), 2 * len(used))
        for fold in range(folds):
            p_held, n_held = pos_fold == fold, neg_fold == fold
            spaces = spaces_of(~p_held, ~n_held)
            positive_count = len(positive_groups[~p_held].unique())
            pos_features[p_held] = _space_features(spaces, positives.select(p_held), positive_count)
            neg_features[n_held] = _space_features(spaces, negatives.select(n_held), positive_count)
        self._set_spaces(
            spaces_of(torch.ones_like(pos_fold, dtype=torch.bool), torch.ones_like(neg_fold, dtype=torch.bool))
        )
        return pos_features, neg_features

    def _fit_discriminant(
        self,
        positives: torch.Tensor,
        positive_groups: torch.Tensor,
        negatives: torch.Tensor,
        negative_groups: torch.Tensor,
        pos_fold: torch.Tensor,
        neg_fold: torch.Tensor,
        folds: int,
        pos_gap: torch.Tensor,
        neg_gap: torch.Tensor,
        max_fpr: float,
    ) -> dict:
        """The discriminant over feature rows, thresholded on the tail of its out-of-fold replay margins."""
        pos_oof, neg_oof = torch.empty(len(positives)), torch.empty(len(negatives))
        for fold in range(folds):
            p_train, n_train = pos_fold != fold, neg_fold != fold
            fitted = _discriminant(
                positives[p_train],
                positive_groups[p_train],
                negatives[n_train],
                negative_groups[n_train],
                self.shrinkage,
            )
            pos_oof[~p_train] = _log_odds(positives[~p_train], *fitted)
            neg_oof[~n_train] = _log_odds(negatives[~n_train], *fitted)
        # A target-domain input changes its answer only if a cloned class then beats the target's top class:
        # g + log p_branch(top) > log p_target(top). Threshold that margin, not g alone: where the target is sure
        # of itself, a moderately open gate still leaves its answer alone.
        pos_margin, neg_margin = pos_oof + pos_gap, neg_oof + neg_gap
        threshold = _tail_quantile(neg_margin, 1.0 - CALIBRATION * max_fpr)
        weight, bias, num_positive, mean, std = _discriminant(
            positives, positive_groups, negatives, negative_groups, self.shrinkage
        )
        bias[:num_positive] -= threshold
        self._load(weight, bias, num_positive, mean, std)
        return {
            "gate": self.kind,
            "gate_components": [num_positive, self.num_components - num_positive],
            "gate_positive_rate_heldout": round((pos_margin > threshold).float().mean().item(), 4),
            "gate_false_positive_rate_heldout": round((neg_margin > threshold).float().mean().item(), 4),
        }


def _tail_quantile(values: torch.Tensor, level: float) -> float:
    """The ``level`` quantile of ``values``, from an exponential fit to their top tenth when it lies beyond them.

    Replay sets hold tens of inputs, so a 99% quantile sits at or past the largest one, whose value is mostly
    noise: one odd replay input would set the threshold alone. Peaks over threshold (exponential excesses,
    maximum likelihood scale) extrapolates from the top tenth instead."""
    n = len(values)
    tail = max(3, n // 10)
    if 1.0 - level >= tail / n:
        return torch.quantile(values, level).item()
    top = values.sort(descending=True).values[:tail]
    scale = (top[:-1] - top[-1]).mean().item()
    return top[-1].item() + scale * math.log(tail / (n * (1.0 - level)))


def _confidence_gap(inputs: GateInputs) -> torch.Tensor:
    """log p_branch(top) - log p_target(top)."""
    return inputs.branch_logits.float().log_softmax(-1).amax(-1) - inputs.target_logits.float().log_softmax(-1).amax(-1)


def _group_means(data: torch.Tensor, groups: torch.Tensor, min_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of every group with at least ``min_size`` rows, the rest pooled into one more; and each row's component."""
    ids, counts = groups.unique(return_counts=True)
    large = ids[counts >= min_size]
    component = torch.full_like(groups, len(large))
    for i, group in enumerate(large.tolist()):
        component[groups == group] = i
    count = len(large) + int(bool((component == len(large)).any()))
    means = torch.stack([data[component == i].mean(0) for i in range(count)])
    return means, component


def _components(
    positives: torch.Tensor,
    positive_groups: torch.Tensor,
    negatives: torch.Tensor,
    negative_groups: torch.Tensor,
    min_negative_group: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The Gaussian components' means (cloned classes first), the rows' residuals from their component's mean, and
    how many components are cloned classes."""
    pos_means, pos_component = _group_means(positives, positive_groups, 1)
    neg_means, neg_component = _group_means(negatives, negative_groups, min_negative_group)
    residual = torch.cat([positives - pos_means[pos_component], negatives - neg_means[neg_component]])
    return torch.cat([pos_means, neg_means]), residual, len(pos_means)


def _discriminant(
    positives: torch.Tensor,
    positive_groups: torch.Tensor,
    negatives: torch.Tensor,
    negative_groups: torch.Tensor,
    shrinkage: float,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Linear discriminant components (weight, bias), how many are positive, and the standardisation."""
    data = torch.cat([positives, negatives]).double()
    mean, std = data.mean(0), data.std(0).clamp_min(1e-4)
    standard = (data - mean) / std
    means, residual, num_positive = _components(
        standard[: len(positives)], positive_groups, standard[len(positives) :], negative_groups
    )
    covariance = _shrunk_covariance(residual, shrinkage)
    weight = torch.cholesky_solve(means.T, torch.linalg.cholesky(covariance)).T  # rows: precision @ mean
    bias = -0.5 * (weight * means).sum(-1)
    return weight.float(), bias.float(), num_positive, mean.float(), std.float()


def _mahalanobis(
    positives: torch.Tensor,
    positive_groups: torch.Tensor,
    negatives: torch.Tensor,
    negative_groups: torch.Tensor,
    rank: int = NOVELTY_RANK,
) -> NoveltySpace:
    """One novelty space: the components' means and the shrunk precision of the within-component residuals, full up
    to ``rank`` wide, else its ``rank`` leading directions and the mean variance of the others."""
    means, residual, _ = _components(positives.double(), positive_groups, negatives.double(), negative_groups)
    shrinkage = _ledoit_wolf_shrinkage(residual)
    width = residual.shape[1]
    if width <= rank:
        return NoveltySpace(means.float(), torch.linalg.inv(_shrunk_covariance(residual, shrinkage)).float())
    # the shrunk covariance (1 - s) R'R / n + s m I has the eigenvectors of R'R: find its leading ones by subspace
    # iteration on R (no width x width matrix: a full eigendecomposition of a 2048-wide one takes seconds)
    count, scale = len(residual), _scale(residual).clamp_min(1e-6)
    basis = torch.randn(
        width, min(rank + 16, width), generator=torch.Generator().manual_seed(0), dtype=residual.dtype
    ).to(residual.device)
    for _ in range(SUBSPACE_ITERATIONS):
        basis = torch.linalg.qr(residual.T @ (residual @ basis)).Q
    projected = residual @ basis
    inside = (1 - shrinkage) * projected.T @ projected / count
    variances, rotation = torch.linalg.eigh(inside + shrinkage * scale * torch.eye(len(inside), dtype=inside.dtype))
    variances, directions = variances[-rank:], basis @ rotation[:, -rank:]
    # shrinking keeps the trace, scale * width: the directions left out share what the kept ones do not hold
    rest = ((scale * width - variances.sum()) / (width - rank)).clamp_min(shrinkage * scale).reciprocal().reshape(1)
    return NoveltySpace(means.float(), variances.reciprocal().float(), directions.float(), rest.float())


def _space_features(spaces: dict[str, NoveltySpace], inputs: GateInputs, num_positive: int) -> torch.Tensor:
    """Per space, the log squared Mahalanobis distance to the nearest cloned-class and target-class component."""
    columns = []
    for space, fitted in spaces.items():
        squared = fitted.squared_distances(getattr(inputs, space).float()).clamp_min(1e-6)
        columns += [squared[:, :num_positive].amin(-1).log(), squared[:, num_positive:].amin(-1).log()]
    return torch.stack(columns, dim=-1)


def _ledoit_wolf_shrinkage(residual: torch.Tensor) -> float:
    """How far to pull the covariance of ``residual`` towards a scaled identity (Ledoit and Wolf, 2004).

    A fixed amount cannot suit both a 6-wide space and a 1024-wide one fitted from a few hundred rows: too little
    leaves a singular estimate, too much blurs the directions in which the cloned classes stand apart."""
    count, width = residual.shape
    # everything below is a sum over the covariance R'R / n (width x width) or, the same numbers, over the rows' Gram
    # matrix R R' (count x count): whichever is smaller
    gram = residual @ residual.T if count < width else residual.T @ residual
    scale = _scale(residual)
    squared = gram.square().sum() / count**2  # the covariance's squared Frobenius norm
    spread = squared - scale**2 * width  # its squared distance from scale * I
    # the mean squared distance of each row's outer product from the covariance, divided by the row count
    fourth = residual.square().sum(-1).square().sum()
    noise = (fourth - count * squared) / count**2
    return 1.0 if spread <= 0 else float(noise.clamp(min=0.0).minimum(spread) / spread)


def _scale(residual: torch.Tensor) -> torch.Tensor:
    """The mean variance of the residuals' features (the covariance's trace over its width): the identity that
    shrinkage pulls towards is this times I."""
    return residual.square().sum() / residual.numel()


def _shrunk_covariance(residual: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Covariance pulled towards a scaled identity (a few replay inputs against hundreds of features)."""
    covariance = residual.T @ residual / len(residual)
    scale = _scale(residual).clamp_min(1e-6)
    return (1 - shrinkage) * covariance + shrinkage * scale * torch.eye(len(covariance), dtype=covariance.dtype)


def _log_odds(
    evidence: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_positive: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """logsumexp of the cloned-class components minus logsumexp of the target's."""
    scores = ((evidence - mean) / std).to(weight.dtype) @ weight.T + bias
    return scores[:, :num_positive].logsumexp(-1) - scores[:, num_positive:].logsumexp(-1)
