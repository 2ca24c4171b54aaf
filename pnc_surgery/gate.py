"""The gate: how much the cloned classes' scores compete with the target's own.

The patched model returns the target's logits ``t`` unchanged, followed by ``z`` for the cloned classes::

    z = logsumexp(t) + g(x) + log_softmax(b)

where ``b`` are the branch's logits and ``g(x)`` is the gate's log-odds that ``x`` belongs to a cloned class.
A softmax over ``[t, z]`` then gives the target's own distribution scaled by ``1 - sigmoid(g)`` and the
branch's scaled by ``sigmoid(g)``: where the gate says "not a cloned class", the target's answer stands
(locality). ``g`` is a logistic regression on standardised evidence: the target's pooled feature at the
insertion point, the target's pre-logits, the target's and the branch's logits and energies. It is fitted on the clone data
(positives) against replay images of the target's domain when there are some, and otherwise set as a
one-class threshold on the energy gap between branch and target.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError

__all__ = ["Gate", "GATE_KINDS", "gate_evidence", "evidence_width"]

GATE_KINDS = ("learned", "energy", "none")


def gate_evidence(
    target_logits: torch.Tensor, branch_logits: torch.Tensor, pooled: torch.Tensor, pre_logits: torch.Tensor
) -> torch.Tensor:
    """The gate's inputs, one row per example: energies, confidences, logits, the pooled target feature at the
    insertion point and the target's pre-logits (the input of its classifier)."""
    target_logits, branch_logits = target_logits.float(), branch_logits.float()
    energy_t, energy_b = target_logits.logsumexp(-1, keepdim=True), branch_logits.logsumexp(-1, keepdim=True)
    confidence_t = target_logits.softmax(-1).amax(-1, keepdim=True)
    confidence_b = branch_logits.softmax(-1).amax(-1, keepdim=True)
    return torch.cat(
        [
            energy_b - energy_t, energy_t, energy_b, confidence_t, confidence_b,
            target_logits, branch_logits, pooled.float(), pre_logits.float(),
        ],
        dim=-1,
    )


def evidence_width(num_old: int, num_new: int, pooled: int, pre_logits: int) -> int:
    """Length of a :func:`gate_evidence` row."""
    return 5 + num_old + num_new + pooled + pre_logits


class Gate(nn.Module):
    """Log-odds that an input belongs to a cloned class, and the combined logits.

    Args:
        kind: ``"learned"`` (logistic regression on all evidence), ``"energy"`` (threshold on the energy gap),
            or ``"none"`` (the branch's raw logits compete as they are: the no-gate ablation).
        num_features: length of :func:`gate_evidence` rows.
        l2: L2 penalty of the logistic regression (on standardised evidence).
    """

    def __init__(self, kind: str, num_features: int, l2: float = 1e-2) -> None:
        super().__init__()
        self.l2 = l2
        if kind not in GATE_KINDS:
            raise InvalidInputError(f"gate kind must be one of {GATE_KINDS}, got {kind!r}")
        self.kind = kind
        self.weight = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def log_odds(self, evidence: torch.Tensor) -> torch.Tensor:
        """``g(x)`` per row of evidence."""
        standard = (evidence - self.mean) / self.std
        return standard.to(self.weight.dtype) @ self.weight + self.bias

    def forward(
        self, target_logits: torch.Tensor, branch_logits: torch.Tensor, pooled: torch.Tensor, pre_logits: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the cloned classes, on the target's scale (see the module docstring)."""
        if self.kind == "none":
            return branch_logits.to(target_logits.dtype)
        evidence = gate_evidence(target_logits, branch_logits, pooled, pre_logits)
        g = self.log_odds(evidence.to(self.mean.dtype))
        z = target_logits.float().logsumexp(-1, keepdim=True) + g.float().unsqueeze(-1) + branch_logits.float().log_softmax(-1)
        return z.to(target_logits.dtype)

    @torch.no_grad()
    def fit(
        self,
        positives: torch.Tensor,
        negatives: torch.Tensor | None,
        *,
        max_false_positive_rate: float = 0.01,
        steps: int = 300,
        seed: int = 0,
    ) -> dict:
        """Fit ``g`` on evidence of cloned-class inputs and (optionally) target-domain inputs.

        Returns:
            What the fit saw: the method used and the rates on the data it had.
        """
        if self.kind == "none":
            return {"gate": "none"}
        if self.kind == "learned" and (negatives is None or len(negatives) < 4):
            self.kind = "energy"
        if self.kind == "energy":
            return self._fit_one_class(positives)
        return self._fit_logistic(positives, negatives, max_false_positive_rate, steps, seed)

    def _fit_one_class(self, positives: torch.Tensor) -> dict:
        """No target-domain data: accept where the branch is surer than the target, as on 97% of the clone data."""
        gap = positives[:, 0]
        spread = gap.std().clamp_min(1e-3)
        threshold = torch.quantile(gap, 0.03)
        self.mean.zero_()
        self.std.fill_(1.0)
        self.weight.zero_()
        self.weight[0] = 4.0 / spread
        self.bias.fill_(float(-4.0 * threshold / spread))
        accepted = (self.log_odds(positives) > 0).float().mean().item()
        return {"gate": "energy", "gate_positive_rate_clone": accepted, "locality_protection": "one-class threshold on the branch/target energy gap (no replay data)"}

    def _fit_logistic(
        self, positives: torch.Tensor, negatives: torch.Tensor, max_fpr: float, steps: int, seed: int, folds: int = 5
    ) -> dict:
        """Class-balanced L2 logistic regression with a threshold set on out-of-fold scores.

        Replay sets are small (tens of images), so the largest replay score badly estimates the tail of the
        target domain. The threshold is instead placed where a normal fit of the out-of-fold replay margins
        (would a cloned class win?) puts ``max_fpr`` of its mass, and never below their empirical quantile.
        """
        gen = torch.Generator().manual_seed(seed)
        data = torch.cat([positives, negatives])
        labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
        fold_of = torch.cat([torch.randperm(len(positives), generator=gen) % folds, torch.randperm(len(negatives), generator=gen) % folds])
        out_of_fold = torch.empty(len(data))
        for fold in range(folds):
            train, test = fold_of != fold, fold_of == fold
            weight, bias, mean, std = _logistic(data[train], labels[train], self.l2, steps)
            out_of_fold[test] = ((data[test] - mean) / std) @ weight + bias
        weight, bias, mean, std = _logistic(data, labels, self.l2, steps)
        self.weight.copy_(weight)
        self.bias.copy_(bias)
        self.mean.copy_(mean)
        self.std.copy_(std)
        # A target-domain input changes its answer only if a cloned class then beats the target's top class:
        # g + log p_branch(top) > log p_target(top). Calibrate that margin, not g alone: where the target is
        # sure of itself, a moderately open gate still leaves its answer alone.
        margin = out_of_fold + _confidence_gap(data)
        neg_scores, pos_scores = margin[labels == 0], margin[labels == 1]
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - max_fpr)).item()
        threshold = max(
            neg_scores.mean().item() + z * neg_scores.std().item(),
            torch.quantile(neg_scores, 1.0 - max_fpr).item(),
        )
        self.bias.sub_(threshold)
        return {
            "gate": "learned",
            "gate_positive_rate_heldout": round((pos_scores > threshold).float().mean().item(), 4),
            "gate_false_positive_rate_heldout": round((neg_scores > threshold).float().mean().item(), 4),
            "locality_protection": f"gate fitted against {len(negatives)} replay inputs of the target's domain",
        }


def _confidence_gap(evidence: torch.Tensor) -> torch.Tensor:
    """log p_branch(top) - log p_target(top), from the confidence columns of :func:`gate_evidence`."""
    return evidence[:, 4].clamp_min(1e-12).log() - evidence[:, 3].clamp_min(1e-12).log()


def _logistic(data: torch.Tensor, labels: torch.Tensor, l2: float, steps: int) -> tuple[torch.Tensor, ...]:
    """Class-balanced L2-regularised logistic regression on standardised data (LBFGS)."""
    mean, std = data.mean(0), data.std(0).clamp_min(1e-4)
    standard = (data - mean) / std
    positives = labels.sum().clamp_min(1)
    negatives = (1 - labels).sum().clamp_min(1)
    sample_weight = torch.where(labels > 0, 0.5 / positives, 0.5 / negatives)
    weight, bias = torch.zeros(data.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(standard @ weight + bias, labels, reduction="none") * sample_weight).sum()
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach(), mean, std
