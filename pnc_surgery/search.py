"""Joint search over (cut, insertion) pairs, and the training of adapter (and branch) it relies on.

Which source cut and which target insertion point work best depend on each other: a deep cut needs a
target feature that is already abstract, a shallow one leaves more of the source to carry the classes.
Every compatible pair gets an adapter, started from the least-squares linear map between the two features. Round
zero scores every pair as it starts (one forward of its branch on the held-out data, no training) and keeps the
best pair of every cut and the best ``survivors``; successive halving then trains the survivors briefly, keeps the
better half and doubles the training of the rest until one pair is left. The score is the local accuracy on
held-out clone data, ties broken by the loss, minus ``cost_weight`` times the pair's cost (the share of the source
the branch would copy); pairs whose scores lie within the held-out set's noise (one standard error) rank cheapest
first, so that a cheaper branch wins unless a costlier one is clearly more accurate. The ranking is returned so
the patch can record what was seen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import Adapter
from .branch import Branch
from .points import Point

__all__ = [
    "Candidate",
    "FitData",
    "train_candidate",
    "evaluate",
    "standard_error",
    "ranked",
    "successive_halving",
    "spread_points",
]


@dataclass
class FitData:
    """Everything a candidate trains on, precomputed once: features, teacher logits, labels, context."""

    target_features: torch.Tensor
    source_features: torch.Tensor | None
    teacher_logits: torch.Tensor
    labels: torch.Tensor
    context: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> FitData:
        """The same rows with every tensor on ``device``."""
        return FitData(
            self.target_features.to(device),
            None if self.source_features is None else self.source_features.to(device),
            self.teacher_logits.to(device),
            self.labels.to(device),
            {k: v.to(device) for k, v in self.context.items()},
        )

    def rows(self, index: torch.Tensor) -> FitData:
        return FitData(
            self.target_features[index],
            None if self.source_features is None else self.source_features[index],
            self.teacher_logits[index],
            self.labels[index],
            {k: v[index] for k, v in self.context.items()},
        )


@dataclass
class Candidate:
    """One (cut, insertion) pair with its adapter under training."""

    cut: Point
    insertion: Point
    branch: Branch
    adapter: Adapter
    steps: int = 0
    accuracy: float = float("nan")
    loss: float = float("nan")
    rounds: int = 0
    optimizer: torch.optim.Optimizer | None = None
    cost: float = 0.0
    """Share of the source the branch copies (0: nothing, 1: all of it), as the search's cost term sees it."""
    cost_weight: float = 0.0
    """Held-out accuracy one whole source's worth of cost is worth in the score."""

    @property
    def score(self) -> float:
        """Held-out local accuracy, ties broken by the loss, less the weighted cost."""
        return _score(self.accuracy, self.loss) - self.cost_weight * self.cost

    def record(self) -> dict:
        return {
            "cut": self.cut.name,
            "insertion": self.insertion.name,
            "heldout_accuracy": _measured(self.accuracy),
            "heldout_loss": _measured(self.loss),
            "cost": round(self.cost, 4),
            "steps": self.steps,
            "rounds": self.rounds,
        }


def _measured(value: float) -> float | None:
    """``value`` rounded for the patch file, or ``None`` where it was never measured (NaN is not JSON)."""
    return round(value, 4) if math.isfinite(value) else None


LOSS_WEIGHT = 0.01
"""Accuracy one unit of held-out loss is worth in a score: held-out sets are small, and accuracy alone often ties."""


COST_DIGITS = 2
"""Costs that agree to this many decimals are equal to :func:`ranked`: a hundredth of the source is no saving."""


def _score(accuracy: float, loss: float) -> float:
    return accuracy - LOSS_WEIGHT * (loss if math.isfinite(loss) else 1e3)


def spread_points(points: Sequence[Point], count: int) -> list[Point]:
    """Up to ``count`` points spread evenly over a model's depth, preferring stage ends, the last always included.

    The whole depth is searched because the best point depends on the pair: an insertion late in the target
    hands the branch only what the target learned for its own classes (on Fashion-MNIST, sandals and
    sneakers blur: held-out local accuracy 0.89 from the target's pooled feature, 0.97 from its stem).
    A stage end is the last point before the feature shape changes; isotropic models (ViT, BERT) have
    few, so evenly spaced blocks fill the remaining places. A point that the next one only lays out anew (a patch
    embedding's NCHW projection and its tokens) is the same feature: only the later of the two is searched.
    """
    points = [p for p, nxt in itertools.pairwise(points) if not _relaid(p, nxt)] + list(points[-1:])
    if len(points) <= count:
        return list(points)
    ends = [p for p, nxt in itertools.pairwise(points) if p.shape != nxt.shape] + [points[-1]]
    chosen: dict[str, Point] = {}
    for pool in (ends, points):
        step = (len(pool) - 1) / max(count - 1, 1)
        for i in range(count):
            if len(chosen) >= count:
                break
            point = pool[round(len(pool) - 1 - i * step)]
            chosen.setdefault(point.name, point)
    return sorted(chosen.values(), key=lambda p: p.index)


def _relaid(point: Point, following: Point) -> bool:
    """Whether ``following`` holds ``point``'s values in another layout (same count, other layout)."""
    return point.layout != following.layout and math.prod(point.shape) == math.prod(following.shape)


def _loss(
    candidate: Candidate, batch: FitData, temperature: float, feature_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = batch.to(candidate.adapter.proj.weight.device)
    adapted = candidate.adapter(batch.target_features)
    logits = candidate.branch(adapted, **batch.context)
    logits = logits.float()
    loss = F.cross_entropy(logits, batch.labels)
    teacher = (batch.teacher_logits / temperature).softmax(-1)
    loss = loss + F.kl_div((logits / temperature).log_softmax(-1), teacher, reduction="batchmean") * temperature**2
    if feature_weight and batch.source_features is not None:
        scale = batch.source_features.float().var().clamp_min(1e-6)
        loss = loss + feature_weight * F.mse_loss(adapted.float(), batch.source_features.float()) / scale
    return loss, logits


def train_candidate(
    candidate: Candidate,
    data: FitData,
    steps: int,
    *,
    lr: float,
    batch_size: int,
    temperature: float,
    feature_weight: float,
    generator: torch.Generator,
    branch_lr: float = 0.0,
    progress: Callable[[int], None] | None = None,
    heldout: FitData | None = None,
    eval_every: int = 0,
    patience: int = 0,
) -> None:
    """Train the candidate's adapter (and, with ``branch_lr`` > 0, its branch) for up to ``steps`` mini-batches.

    Args:
        heldout, eval_every, patience: with all three set, score on ``heldout`` before training and every
            ``eval_every`` steps, stop once ``patience`` scores in a row have not beaten the best, and keep the best
            weights seen (the starting ones included).
    """
    if candidate.optimizer is None or branch_lr:
        groups = [{"params": list(candidate.adapter.parameters()), "lr": lr}]
        branch_params = [p for p in candidate.branch.parameters() if p.numel()]
        for p in branch_params:
            p.requires_grad_(bool(branch_lr))
        if branch_lr:
            groups.append({"params": branch_params, "lr": branch_lr})
        # foreach: one kernel per step for all tensors (torch picks it on CUDA only; on a CPU the per-tensor loop
        # cost a sixth of a small branch's step)
        candidate.optimizer = torch.optim.AdamW(groups, weight_decay=1e-4, foreach=True)
    optimizer = candidate.optimizer
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1)) if branch_lr else None
    stopping = heldout is not None and eval_every > 0 and patience > 0
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    best_score, best_state, stale = -math.inf, None, 0
    if stopping:  # the starting weights are a candidate too: a training that only hurts gives them back
        assert heldout is not None
        candidate.adapter.eval()
        best_score = _score(*evaluate(candidate, heldout, temperature, feature_weight))
        best_state = [p.detach().clone() for p in trained]
    done = 0
    candidate.adapter.train()
    for step in range(steps):
        index = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=generator)
        loss, _ = _loss(candidate, data.rows(index), temperature, feature_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if math.isfinite(float(torch.nn.utils.clip_grad_norm_(trained, math.inf))):
            optimizer.step()  # a step with non-finite gradients (reduced precision can overflow) is skipped
            if schedule is not None:
                schedule.step()
        done = step + 1
        if progress is not None:
            progress(1)
        if stopping and (done % eval_every == 0 or done == steps):
            assert heldout is not None
            candidate.adapter.eval()
            accuracy, held_loss = evaluate(candidate, heldout, temperature, feature_weight)
            candidate.adapter.train()
            score = _score(accuracy, held_loss)
            if score > best_score:
                best_score, best_state, stale = score, [p.detach().clone() for p in trained], 0
            else:
                stale += 1
                if stale >= patience:
                    break
    if best_state is not None:
        with torch.no_grad():
            for p, value in zip(trained, best_state):
                p.copy_(value)
    if progress is not None and done < steps:
        progress(steps - done)
    candidate.steps += done
    candidate.adapter.eval()
    for p in candidate.branch.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def evaluate(
    candidate: Candidate, data: FitData, temperature: float, feature_weight: float, batch_size: int = 256
) -> tuple[float, float]:
    """Local accuracy (argmax among the cloned classes) and mean loss on ``data``."""
    correct, total_loss = 0, 0.0
    for start in range(0, len(data), batch_size):
        batch = data.rows(torch.arange(start, min(start + batch_size, len(data))))
        loss, logits = _loss(candidate, batch, temperature, feature_weight)
        correct += int((logits.argmax(-1).cpu() == batch.labels.cpu()).sum())
        total_loss += float(loss) * len(batch)
    return correct / max(len(data), 1), total_loss / max(len(data), 1)


def standard_error(accuracy: float, size: int) -> float:
    """Standard error of the difference between two accuracies near ``accuracy``, each measured on ``size``
    held-out examples; the rate is the add-one estimate, so that a perfect score on a small set keeps its
    uncertainty."""
    if size <= 0 or not math.isfinite(accuracy):
        return 0.0
    rate = (accuracy * size + 1) / (size + 2)
    return math.sqrt(2 * rate * (1 - rate) / size)


def ranked(candidates: Sequence[Candidate], heldout_size: int) -> list[Candidate]:
    """``candidates`` best first: by score, except that among those whose score is within one
    :func:`standard_error` (on ``heldout_size`` examples) of the best, the cheapest comes first, and at equal cost
    the one with the lower held-out loss.

    A held-out set of tens of examples cannot tell accuracies a few points apart; between candidates it scores
    alike, the one that copies less of the source wins (costs compared to :data:`COST_DIGITS` decimals, and not at
    all with a ``cost_weight`` of 0), and the held-out loss, which every example moves a little, decides between
    pairs of equal cost.
    """
    by_score = sorted(candidates, key=lambda c: c.score, reverse=True)
    if not by_score:
        return by_score
    best = by_score[0]
    margin = standard_error(best.accuracy, heldout_size)
    tied = [c for c in by_score if c.score >= best.score - margin]
    leader = min(tied, key=lambda c: (_rounded_cost(c), c.loss if math.isfinite(c.loss) else math.inf))
    return [leader, *(c for c in by_score if c is not leader)]


def _rounded_cost(candidate: Candidate) -> float:
    return round(candidate.cost, COST_DIGITS) if candidate.cost_weight > 0 else 0.0


def successive_halving(
    candidates: list[Candidate],
    fit: Callable[[Candidate], FitData],
    heldout: Callable[[Candidate], FitData],
    *,
    first_steps: int,
    lr: float,
    batch_size: int,
    temperature: float,
    feature_weight: float,
    generator: torch.Generator,
    survivors: int | None = None,
    progress: bool = True,
) -> tuple[Candidate, list[dict]]:
    """Score all candidates untrained and keep the best pair of every cut, and more up to ``survivors``; then train
    them briefly, keep the better half (:func:`ranked`), double the budget, until one is left (a lone candidate is
    trained one round).

    Round zero keeps every cut because it scores a cut by how well a least-squares map reaches it: a cut right
    after a linear patch embedding is reached almost exactly and scores high untrained, while a deeper, cheaper
    cut needs training to show what it can do.

    Args:
        fit, heldout: the training and scoring data of a candidate (features depend on its points).
        first_steps: training steps of each survivor in the first round.
        survivors: how many candidates round zero keeps at least (``None``: all).

    Returns:
        The winner and the ranking of every candidate (best first) with the round it reached.
    """
    seen: list[Candidate] = []
    alive = list(candidates)
    size = min((len(heldout(c)) for c in alive), default=0)
    for candidate in alive:
        candidate.accuracy, candidate.loss = evaluate(candidate, heldout(candidate), temperature, feature_weight)
    alive = ranked(alive, size)
    if survivors is not None and len(alive) > survivors:
        kept = {id(c) for c in {c.cut.name: c for c in reversed(alive)}.values()}  # the best pair of every cut
        for candidate in alive:
            if len(kept) >= survivors:
                break
            kept.add(id(candidate))
        seen, alive = [c for c in alive if id(c) not in kept], [c for c in alive if id(c) in kept]
    steps, sizes = first_steps, [len(alive)]
    while sizes[-1] > 1:  # the rounds' sizes: the better half goes on, until one is left
        sizes.append(sizes[-1] // 2)
    total = sum(first_steps * 2**r * size for r, size in enumerate(sizes[:-1] or sizes))
    with tqdm(total=total, desc="pnc: search (cut, insertion)", disable=not progress, leave=False) as bar:
        while True:
            for candidate in alive:
                train_candidate(
                    candidate,
                    fit(candidate),
                    steps,
                    lr=lr,
                    batch_size=batch_size,
                    temperature=temperature,
                    feature_weight=feature_weight,
                    generator=generator,
                    progress=bar.update,
                )
                candidate.accuracy, candidate.loss = evaluate(
                    candidate, heldout(candidate), temperature, feature_weight
                )
                candidate.rounds += 1
            alive = ranked(alive, size)
            keep = max(1, len(alive) // 2)
            seen.extend(alive[keep:])
            alive = alive[:keep]
            if len(alive) == 1:  # a lone survivor needs no ranking round: the final training goes on from here
                break
            steps *= 2
    ranking = [alive[0], *sorted(seen, key=lambda c: (c.rounds, c.score), reverse=True)]
    return alive[0], [c.record() for c in ranking]
