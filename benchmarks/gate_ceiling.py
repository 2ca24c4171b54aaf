"""Where a pair's gate loses cloned-class inputs: at its threshold or in its evidence.

``python -m benchmarks.gate_ceiling DIR`` reads the gate inputs that ``python -m benchmarks.pair_matrix --dump DIR``
saved (clone data, replay set with its shifted copies, test split) and, per pair, fits the gate as ``clone`` does
and compares what it passes of K's test inputs with three ceilings, all at the same false-positive budget:

* ``threshold ceiling``: the same fitted gate, its threshold set on the test split itself so that exactly the
  budget of A's test inputs pass. Near the gate's own pass rate, the threshold (estimated from a hundred replay
  inputs) is not what loses inputs; far above it, calibration is.
* ``per space``: each novelty space alone (target pre-logits, branch features, target insertion feature), at the
  test-set threshold.
* ``linear probe``: :func:`benchmarks.separability.linear_bound` on every gate input together (logits, pre-logits,
  branch features, insertion feature), a logistic regression fitted out of fold on the test split (4/5 of it, about
  four times the replay set) and thresholded on it: what a linear gate with more target-domain data could do.
* ``replay probe``: a logistic regression over every gate input fitted on what the gate itself is given (the clone
  rows against the replay rows with their shifted copies), at the test-set threshold: a linear gate on all of the
  evidence, with the benchmark's data.
* ``k-NN``: a non-parametric score with no linear or Gaussian form: per novelty space, the log distance to the
  k-th nearest replay row minus that to the k-th nearest clone row (features centred and scaled to unit length, as
  in deep nearest-neighbour out-of-distribution detection), the best of the spaces alone and of their sum (each
  standardized on A's test inputs), at the test-set threshold.

Every figure is a share of K's test inputs let through, divided by the branch's accuracy on them alone (the pair
matrix's ``acc_k / branch`` target is 0.9). Three more columns turn the gate's pass into ``acc_all``: the patched
target's (``acc_all``), with the gate's threshold set on the test split (``acc_all_ceiling``), and with a perfect
gate, every input of K to the branch and every other to the target (``acc_all_perfect_gate``). The Fashion-MNIST
cells' evidence comes from ``python -m benchmarks.frontier --dump DIR``::

    python -m benchmarks.pair_matrix --pairs "resnet18->deit_tiny" --dump results/evidence
    python -m benchmarks.gate_ceiling results/evidence
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pnc_surgery.evidence import GateInputs
from pnc_surgery.gate import AUTO_ALTERNATIVES, SPACES, Gate

from .pair_matrix import gate_outcome, refit_gate
from .separability import linear_bound

__all__ = ["ceilings", "main"]


def _margin(gate: Gate, seen: GateInputs) -> torch.Tensor:
    """How far the best cloned class beats the target's top class in the patched logits (> 0: sent to K)."""
    with torch.no_grad():
        return gate(*seen).float().amax(1) - seen.target_logits.float().amax(1)


def _passed_at_budget(score: torch.Tensor, is_k: torch.Tensor, budget: float) -> torch.Tensor:
    """Which inputs score above the threshold that lets ``budget`` of A's inputs through."""
    return score > torch.quantile(score[~is_k].double(), 1.0 - budget).item()


def _pass_at_budget(score: torch.Tensor, is_k: torch.Tensor, budget: float) -> float:
    """Share of K's inputs above the threshold that lets ``budget`` of A's inputs through."""
    return _passed_at_budget(score, is_k, budget)[is_k].float().mean().item()


def _only(inputs: GateInputs, space: str) -> GateInputs:
    """``inputs`` with every novelty space but ``space`` emptied."""
    return inputs._replace(**{s: getattr(inputs, s)[:, :0] for s in SPACES if s != space})


KNN_NEIGHBOURS = (1, 5)
"""The k of the k-NN ceiling's distances (the best k is kept)."""
KNN_CLONE_ROWS = 2000
"""Clone rows the k-NN ceiling and the replay probe use (a seeded sample: a distance matrix to every clone row is
large)."""


def _clone_sample(positives: GateInputs) -> GateInputs:
    """A seeded sample of :data:`KNN_CLONE_ROWS` clone rows."""
    generator = torch.Generator().manual_seed(0)
    return positives.select(torch.randperm(len(positives.target_logits), generator=generator)[:KNN_CLONE_ROWS])


def _kth_distance(queries: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Log distance of each query to its k-th nearest reference row."""
    return torch.cdist(queries, reference).topk(k, largest=False).values[:, -1].clamp_min(1e-6).log()


def _knn_scores(evidence: dict[str, Any], seen: GateInputs, k: int) -> list[torch.Tensor]:
    """Per used novelty space, log(distance to the k-th nearest replay row / to the k-th nearest clone row)."""
    sample = _clone_sample(evidence["positives"])
    scores = []
    for space in SPACES:
        clone, replay, test = (getattr(part, space).float() for part in (sample, evidence["negatives"], seen))
        if not test.shape[1]:
            continue
        centre = torch.cat([clone, replay]).mean(0)
        clone, replay, test = (F.normalize(x - centre, dim=1) for x in (clone, replay, test))
        scores.append(_kth_distance(test, replay, k) - _kth_distance(test, clone, k))
    return scores


def knn_ceiling(evidence: dict[str, Any], seen: GateInputs, is_k: torch.Tensor, budget: float) -> float:
    """Share of K's inputs the best k-NN score passes at the test-set threshold (see the module docstring)."""
    best = 0.0
    for k in KNN_NEIGHBOURS:
        scores = _knn_scores(evidence, seen, k)
        standard = [(s - s[~is_k].mean()) / s[~is_k].std().clamp_min(1e-6) for s in scores]
        for score in [*scores, torch.stack(standard).sum(0)]:
            best = max(best, _pass_at_budget(score, is_k, budget))
    return best


REPLAY_PROBE_STRENGTHS = (0.01, 0.1, 1.0)
"""Inverse regularisation strengths of the replay probe (the best at the test-set threshold is kept)."""


def replay_probe(evidence: dict[str, Any], seen: GateInputs, is_k: torch.Tensor, budget: float) -> float:
    """Share of K's inputs a logistic regression of the clone rows against the replay rows passes over every gate
    input, at the test-set threshold (see the module docstring)."""
    clone, replay = _joined(_clone_sample(evidence["positives"])), _joined(evidence["negatives"])
    x = torch.cat([clone, replay]).numpy()
    y = torch.cat([torch.ones(len(clone)), torch.zeros(len(replay))]).numpy()
    test = _joined(seen).numpy()
    best = 0.0
    for strength in REPLAY_PROBE_STRENGTHS:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=strength, class_weight="balanced", max_iter=5000))
        score = torch.from_numpy(probe.fit(x, y).decision_function(test))
        best = max(best, _pass_at_budget(score, is_k, budget))
    return best


def _joined(inputs: GateInputs) -> torch.Tensor:
    """Every part of the gate inputs side by side (float64)."""
    return torch.cat([part.double() for part in inputs], 1)


def acc_all_at(passed: torch.Tensor, seen: GateInputs, labels: torch.Tensor, num_old: int) -> float:
    """``acc_all`` of a patched target that answers ``passed`` inputs with the branch's class, the rest as the target
    does."""
    answer = torch.where(passed, seen.branch_logits.argmax(1) + num_old, seen.target_logits.argmax(1))
    return (answer == labels).float().mean().item()


def ceilings(dump: dict[str, Any], budget: float = 0.01, seed: int = 0) -> dict[str, Any]:
    """The gate's pass rate and its ceilings for one dumped pair (see the module docstring)."""
    evidence = {k: GateInputs(**v) if isinstance(v, dict) else v for k, v in dump["evidence"].items()}
    seen, labels, num_old = GateInputs(**dump["test"]), dump["test_labels"], int(dump["num_old"])
    is_k = labels >= num_old
    branch_right = seen.branch_logits[is_k].argmax(1) == labels[is_k] - num_old
    branch_acc = branch_right.float().mean().item()
    gate, _ = refit_gate("novelty", evidence, budget, seed, also_try=AUTO_ALTERNATIVES)
    outcome = gate_outcome(gate, seen, labels, num_old)
    margin = _margin(gate, seen)
    row: dict[str, Any] = {
        "branch_acc_k": branch_acc,
        "gate": gate.kind,
        "gate_pass": outcome["pass_rate_k"] / branch_acc,
        "false_positive_rate": outcome["false_positive_rate"],
        "threshold_ceiling": _pass_at_budget(margin, is_k, budget) / branch_acc,
        "acc_all": outcome["acc_all"],
        "acc_all_ceiling": acc_all_at(_passed_at_budget(margin, is_k, budget), seen, labels, num_old),
        "acc_all_perfect_gate": acc_all_at(is_k, seen, labels, num_old),
    }
    for space in SPACES:
        if getattr(seen, space).shape[1]:
            alone = {k: _only(v, space) if isinstance(v, GateInputs) else v for k, v in evidence.items()}
            space_gate, _ = refit_gate("novelty", alone, budget, seed)
            row[space] = _pass_at_budget(_margin(space_gate, _only(seen, space)), is_k, budget) / branch_acc
    target_right = seen.target_logits.argmax(1) == labels
    probe = linear_bound(_joined(seen), labels, target_right, num_old, budget)
    row["linear_probe"] = sum(probe["pass_rate"].values()) / len(probe["pass_rate"]) / branch_acc
    row["replay_probe"] = replay_probe(evidence, seen, is_k, budget) / branch_acc
    row["knn"] = knn_ceiling(evidence, seen, is_k, budget) / branch_acc
    return row


COLUMNS = (
    "gate_pass",
    "false_positive_rate",
    "threshold_ceiling",
    *SPACES,
    "linear_probe",
    "replay_probe",
    "knn",
    "acc_all",
    "acc_all_ceiling",
    "acc_all_perfect_gate",
)
"""The table's columns after the pair, its seed, the branch's accuracy on K and the gate's kind."""


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The ceilings table, one row per dump and their mean."""
    lines = [f"| pair | seed | branch_acc_k | gate | {' | '.join(COLUMNS)} |", f"|{'---|' * (4 + len(COLUMNS))}"]
    for row in rows:
        cells = [f"{row[c]:.3f}" if c in row else "–" for c in COLUMNS]
        lines.append(
            f"| {row['pair']} | {row['seed']} | {row['branch_acc_k']:.3f} | {row['gate']} | {' | '.join(cells)} |"
        )
    means = [f"{sum(r[c] for r in rows) / len(rows):.3f}" if all(c in r for r in rows) else "–" for c in COLUMNS]
    branch = sum(r["branch_acc_k"] for r in rows) / len(rows)
    lines.append(f"| **mean** | | {branch:.3f} | | {' | '.join(means)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gate_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("dumps", type=Path, help="folder of pair_matrix --dump or frontier --dump files")
    parser.add_argument("--budget", type=float, default=0.01, help="false-positive budget (default 0.01)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows (JSON) and the table here")
    args = parser.parse_args(argv)
    rows = []
    for path in sorted(args.dumps.glob("*.pt")):
        pair, seed = path.stem.rsplit("_seed", 1)
        row = {"pair": pair.replace("__", "->"), "seed": int(seed)}
        row.update(ceilings(torch.load(path, weights_only=False), args.budget))
        rows.append(row)
        print(markdown(rows).splitlines()[-2], flush=True)
    table = markdown(rows)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gate_ceiling.json").write_text(json.dumps({"budget": args.budget, "rows": rows}, indent=1))
        (args.out / "gate_ceiling.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
