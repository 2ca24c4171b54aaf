"""The gate: how much the cloned classes' scores compete with the target's own.

The patched model returns the target's logits ``t`` unchanged, followed by ``z`` for the cloned classes::

    z = logsumexp(t) + g(x) + log_softmax(b)

where ``b`` are the branch's logits and ``g(x)`` is the gate's log-odds that ``x`` belongs to a cloned class.
A softmax over ``[t, z]`` then gives the target's own distribution scaled by ``1 - sigmoid(g)`` and the
branch's scaled by ``sigmoid(g)``: where the gate says "not a cloned class", the target's answer stands
(locality). ``g`` is a logistic regression on standardised evidence: the target's pooled feature at the
insertion point, the target's and the branch's logits and energies. It is fitted on the clone data
(positives) against replay images of the target's domain when there are some, and otherwise set as a
one-class threshold on the energy gap between branch and target.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError

__all__ = ["Gate", "GATE_KINDS", "gate_evidence", "evidence_width"]

GATE_KINDS = ("learned", "energy", "none")


def gate_evidence(target_logits: torch.Tensor, branch_logits: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The gate's inputs: energies, confidences, logits and the pooled target feature, one row per example."""
    target_logits, branch_logits = target_logits.float(), branch_logits.float()
    energy_t, energy_b = target_logits.logsumexp(-1, keepdim=True), branch_logits.logsumexp(-1, keepdim=True)
    confidence_t = target_logits.softmax(-1).amax(-1, keepdim=True)
    confidence_b = branch_logits.softmax(-1).amax(-1, keepdim=True)
    return torch.cat(
        [energy_b - energy_t, energy_t, energy_b, confidence_t, confidence_b, target_logits, branch_logits, pooled.float()],
        dim=-1,
    )


def evidence_width(num_old: int, num_new: int, pooled: int) -> int:
    """Length of a :func:`gate_evidence` row."""
    return 5 + num_old + num_new + pooled


class Gate(nn.Module):
    """Log-odds that an input belongs to a cloned class, and the combined logits.

    Args:
        kind: ``"learned"`` (logistic regression on all evidence), ``"energy"`` (threshold on the energy gap),
            or ``"none"`` (the branch's raw logits compete as they are: the no-gate ablation).
        num_features: length of :func:`gate_evidence` rows.
    """

    def __init__(self, kind: str, num_features: int) -> None:
        super().__init__()
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

    def forward(self, target_logits: torch.Tensor, branch_logits: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits of the cloned classes, on the target's scale (see the module docstring)."""
        if self.kind == "none":
            return branch_logits.to(target_logits.dtype)
        evidence = gate_evidence(target_logits, branch_logits, pooled)
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
        self, positives: torch.Tensor, negatives: torch.Tensor, max_fpr: float, steps: int, seed: int
    ) -> dict:
        """Class-balanced L2 logistic regression; the bias is then shifted on held-out negatives to bound false positives."""
        gen = torch.Generator().manual_seed(seed)
        pos_perm, neg_perm = torch.randperm(len(positives), generator=gen), torch.randperm(len(negatives), generator=gen)
        pos_fit, pos_held = positives[pos_perm[len(positives) // 4 :]], positives[pos_perm[: len(positives) // 4]]
        neg_fit, neg_held = negatives[neg_perm[len(negatives) // 4 :]], negatives[neg_perm[: len(negatives) // 4]]
        data = torch.cat([pos_fit, neg_fit])
        self.mean.copy_(data.mean(0))
        self.std.copy_(data.std(0).clamp_min(1e-4))
        labels = torch.cat([torch.ones(len(pos_fit)), torch.zeros(len(neg_fit))])
        weights = torch.cat([torch.full((len(pos_fit),), 0.5 / len(pos_fit)), torch.full((len(neg_fit),), 0.5 / len(neg_fit))])
        standard = (data - self.mean) / self.std
        weight, bias = torch.zeros(data.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
        l2 = 1e-2 / data.shape[1] ** 0.5

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = standard @ weight + bias
            loss = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights).sum()
            loss = loss + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight.copy_(weight.detach())
        self.bias.copy_(bias.detach())
        held = neg_held if len(neg_held) else neg_fit
        scores = self.log_odds(held)
        allowed = max(0, math.floor(max_fpr * len(held)))
        boundary = torch.sort(scores, descending=True).values[allowed].item() if allowed < len(held) else -math.inf
        margin = 0.5
        if boundary + margin > 0:
            self.bias.sub_(boundary + margin)
        pos_rate = (self.log_odds(pos_held if len(pos_held) else pos_fit) > 0).float().mean().item()
        neg_rate = (self.log_odds(held) > 0).float().mean().item()
        return {
            "gate": "learned",
            "gate_positive_rate_heldout": pos_rate,
            "gate_false_positive_rate_heldout": neg_rate,
            "locality_protection": f"gate fitted against {len(negatives)} replay inputs of the target's domain",
        }
