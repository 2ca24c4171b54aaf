"""The gate: how much the cloned classes' scores compete with the target's own.

The patched model returns the target's logits ``t`` unchanged, followed by ``z`` for the cloned classes::

    z = logsumexp(t) + g(x) + log_softmax(b)

where ``b`` are the branch's logits and ``g(x)`` is the gate's log-odds that ``x`` belongs to a cloned class.
A softmax over ``[t, z]`` then gives the target's own distribution scaled by ``1 - sigmoid(g)`` and the
branch's scaled by ``sigmoid(g)``: where the gate says "not a cloned class", the target's answer stands
(locality).

``g`` is a discriminant over the evidence (the target's and the branch's logits, energies and confidences, and
the target's pre-logits): one Gaussian component per cloned class (from the clone data) and one per target class
seen in the replay data, sharing one shrunk covariance::

    g(x) = logsumexp_k(w_k . x + c_k) - logsumexp_a(w_a . x + c_a)

Replay sets are small (tens of images), which a logistic regression over hundreds of features overfits; the
shared covariance is estimated mostly from the plentiful clone data instead (measured against a logistic
regression on Fashion-MNIST and digits: as much locality, more new-class accuracy). The threshold is the
``1 - max_false_positive_rate`` quantile of the out-of-fold replay margins, extrapolated from their tail (see
:func:`_tail_quantile`). Without replay data the gate is a one-class threshold on the energy gap between branch
and target.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import InvalidInputError

__all__ = ["Gate", "GATE_KINDS", "gate_evidence", "evidence_width"]

GATE_KINDS = ("learned", "energy", "none")


def gate_evidence(target_logits: torch.Tensor, branch_logits: torch.Tensor, pre_logits: torch.Tensor) -> torch.Tensor:
    """The gate's inputs, one row per example: energies, confidences, logits and the target's pre-logits (the
    input of its classifier)."""
    target_logits, branch_logits = target_logits.float(), branch_logits.float()
    energy_t, energy_b = target_logits.logsumexp(-1, keepdim=True), branch_logits.logsumexp(-1, keepdim=True)
    confidence_t = target_logits.softmax(-1).amax(-1, keepdim=True)
    confidence_b = branch_logits.softmax(-1).amax(-1, keepdim=True)
    return torch.cat(
        [energy_b - energy_t, energy_t, energy_b, confidence_t, confidence_b, target_logits, branch_logits, pre_logits.float()],
        dim=-1,
    )


def evidence_width(num_old: int, num_new: int, pre_logits: int) -> int:
    """Length of a :func:`gate_evidence` row."""
    return 5 + num_old + num_new + pre_logits


class Gate(nn.Module):
    """Log-odds that an input belongs to a cloned class, and the combined logits.

    Args:
        kind: ``"learned"`` (discriminant against replay data), ``"energy"`` (threshold on the energy gap), or
            ``"none"`` (the branch's raw logits compete as they are: the no-gate ablation).
        num_features: length of :func:`gate_evidence` rows.
        num_components: rows of ``weight``: linear scores whose logsumexps are compared (the discriminant's
            Gaussian components; the energy gate's gap and a constant zero).
        num_positive: how many of them, first, stand for the cloned classes.
        shrinkage: how far the shared covariance is pulled towards a scaled identity when fitting, in [0, 1].
    """

    def __init__(
        self, kind: str, num_features: int, num_components: int = 2, num_positive: int = 1, shrinkage: float = 0.1
    ) -> None:
        super().__init__()
        if kind not in GATE_KINDS:
            raise InvalidInputError(f"gate kind must be one of {GATE_KINDS}, got {kind!r}")
        if not 0 < num_positive < num_components:
            raise InvalidInputError(f"a gate needs cloned-class and target components, got {num_positive} of {num_components}")
        self.kind = kind
        self.num_positive = num_positive
        self.shrinkage = shrinkage
        self.weight = nn.Parameter(torch.zeros(num_components, num_features))
        self.bias = nn.Parameter(torch.zeros(num_components))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    @property
    def num_components(self) -> int:
        return self.weight.shape[0]

    def log_odds(self, evidence: torch.Tensor) -> torch.Tensor:
        """``g(x)`` per row of evidence."""
        return _log_odds(evidence, self.weight, self.bias, self.num_positive, self.mean, self.std)

    def forward(self, target_logits: torch.Tensor, branch_logits: torch.Tensor, pre_logits: torch.Tensor) -> torch.Tensor:
        """Logits of the cloned classes, on the target's scale (see the module docstring)."""
        if self.kind == "none":
            return branch_logits.to(target_logits.dtype)
        evidence = gate_evidence(target_logits, branch_logits, pre_logits)
        g = self.log_odds(evidence.to(self.mean.dtype))
        z = target_logits.float().logsumexp(-1, keepdim=True) + g.float().unsqueeze(-1) + branch_logits.float().log_softmax(-1)
        return z.to(target_logits.dtype)

    @torch.no_grad()
    def fit(
        self,
        positives: torch.Tensor,
        positive_groups: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negative_groups: torch.Tensor | None = None,
        *,
        negative_sources: torch.Tensor | None = None,
        max_false_positive_rate: float = 0.01,
        folds: int = 5,
        seed: int = 0,
    ) -> dict:
        """Fit ``g`` on evidence of cloned-class inputs and (optionally) target-domain inputs.

        Args:
            positives: evidence rows of the clone data; ``positive_groups`` their cloned class (0, 1, ...).
            negatives: evidence rows of replay inputs; ``negative_groups`` their target class (labels where the
                replay data has them, else the target's predictions).
            negative_sources: which replay input each negative row comes from (augmented copies share one), so
                that no out-of-fold score comes from a model that saw a copy of its input.
            max_false_positive_rate: share of target-domain inputs a cloned class may take.
            folds: out-of-fold rounds that score the replay inputs for the threshold.

        Returns:
            What the fit saw: the method used and the rates on the data it had.
        """
        if self.kind == "none":
            return {"gate": "none"}
        if negatives is not None and negative_sources is None:
            negative_sources = torch.arange(len(negatives))
        if self.kind == "learned" and (negatives is None or len(negative_sources.unique()) < folds):
            self.kind = "energy"
        if self.kind == "energy":
            return self._fit_one_class(positives)
        return self._fit_learned(
            positives, positive_groups, negatives, negative_groups, negative_sources, max_false_positive_rate, folds, seed
        )

    def _load(self, weight: torch.Tensor, bias: torch.Tensor, num_positive: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.weight = nn.Parameter(weight.to(self.weight))
        self.bias = nn.Parameter(bias.to(self.bias))
        self.num_positive = num_positive
        self.mean.copy_(mean)
        self.std.copy_(std)

    def _fit_one_class(self, positives: torch.Tensor) -> dict:
        """No target-domain data: accept where the branch is surer than the target, as on 97% of the clone data."""
        gap = positives[:, 0]
        spread = gap.std().clamp_min(1e-3)
        threshold = torch.quantile(gap, 0.03)
        weight = torch.zeros(2, positives.shape[1])
        weight[0, 0] = 4.0 / spread
        bias = torch.tensor([float(-4.0 * threshold / spread), 0.0])
        self._load(weight, bias, 1, torch.zeros(positives.shape[1]), torch.ones(positives.shape[1]))
        accepted = (self.log_odds(positives) > 0).float().mean().item()
        return {"gate": "energy", "gate_positive_rate_clone": accepted, "locality_protection": "one-class threshold on the branch/target energy gap (no replay data)"}

    def _fit_learned(
        self, positives: torch.Tensor, positive_groups: torch.Tensor, negatives: torch.Tensor,
        negative_groups: torch.Tensor | None, negative_sources: torch.Tensor, max_fpr: float, folds: int, seed: int,
    ) -> dict:
        """The discriminant, thresholded on the tail of its out-of-fold replay margins."""
        if negative_groups is None:
            negative_groups = torch.zeros(len(negatives), dtype=torch.long)

        gen = torch.Generator().manual_seed(seed)
        pos_fold = torch.randperm(len(positives), generator=gen) % folds
        sources, source_of = negative_sources.unique(return_inverse=True)
        neg_fold = (torch.randperm(len(sources), generator=gen) % folds)[source_of]  # copies of one input share a fold
        pos_oof, neg_oof = torch.empty(len(positives)), torch.empty(len(negatives))
        for fold in range(folds):
            p_train, n_train = pos_fold != fold, neg_fold != fold
            fitted = _discriminant(
                positives[p_train], positive_groups[p_train], negatives[n_train], negative_groups[n_train], self.shrinkage
            )
            pos_oof[~p_train] = _log_odds(positives[~p_train], *fitted)
            neg_oof[~n_train] = _log_odds(negatives[~n_train], *fitted)
        # A target-domain input changes its answer only if a cloned class then beats the target's top class:
        # g + log p_branch(top) > log p_target(top). Threshold that margin, not g alone: where the target is sure
        # of itself, a moderately open gate still leaves its answer alone.
        pos_margin = pos_oof + _confidence_gap(positives)
        neg_margin = neg_oof + _confidence_gap(negatives)
        threshold = _tail_quantile(neg_margin, 1.0 - max_fpr)
        weight, bias, num_positive, mean, std = _discriminant(positives, positive_groups, negatives, negative_groups, self.shrinkage)
        bias[:num_positive] -= threshold
        self._load(weight, bias, num_positive, mean, std)
        return {
            "gate": "learned",
            "gate_components": [num_positive, self.num_components - num_positive],
            "gate_positive_rate_heldout": round((pos_margin > threshold).float().mean().item(), 4),
            "gate_false_positive_rate_heldout": round((neg_margin > threshold).float().mean().item(), 4),
            "locality_protection": f"gate fitted against {len(sources)} replay inputs of the target's domain"
            + (f" ({len(negatives)} rows with their shifted copies)" if len(negatives) > len(sources) else ""),
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


def _confidence_gap(evidence: torch.Tensor) -> torch.Tensor:
    """log p_branch(top) - log p_target(top), from the confidence columns of :func:`gate_evidence`."""
    return evidence[:, 4].clamp_min(1e-12).log() - evidence[:, 3].clamp_min(1e-12).log()


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


def _discriminant(
    positives: torch.Tensor, positive_groups: torch.Tensor, negatives: torch.Tensor, negative_groups: torch.Tensor,
    shrinkage: float, min_negative_group: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Linear discriminant components (weight, bias), how many are positive, and the standardisation."""
    data = torch.cat([positives, negatives]).double()
    mean, std = data.mean(0), data.std(0).clamp_min(1e-4)
    standard = (data - mean) / std
    pos, neg = standard[: len(positives)], standard[len(positives) :]
    pos_means, pos_component = _group_means(pos, positive_groups, 1)
    neg_means, neg_component = _group_means(neg, negative_groups, min_negative_group)
    residual = torch.cat([pos - pos_means[pos_component], neg - neg_means[neg_component]])
    covariance = _shrunk_covariance(residual, shrinkage)
    means = torch.cat([pos_means, neg_means])
    weight = torch.cholesky_solve(means.T, torch.linalg.cholesky(covariance)).T  # rows: precision @ mean
    bias = -0.5 * (weight * means).sum(-1)
    return weight.float(), bias.float(), len(pos_means), mean.float(), std.float()


def _shrunk_covariance(residual: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Covariance pulled towards a scaled identity (a few replay inputs against hundreds of features)."""
    covariance = residual.T @ residual / len(residual)
    scale = covariance.diagonal().mean().clamp_min(1e-6)
    return (1 - shrinkage) * covariance + shrinkage * scale * torch.eye(len(covariance), dtype=covariance.dtype)


def _log_odds(
    evidence: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_positive: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """logsumexp of the cloned-class components minus logsumexp of the target's."""
    scores = ((evidence - mean) / std).to(weight.dtype) @ weight.T + bias
    return scores[:, :num_positive].logsumexp(-1) - scores[:, num_positive:].logsumexp(-1)
