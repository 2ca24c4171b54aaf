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

Every figure is a share of K's test inputs let through, divided by the branch's accuracy on them alone (the pair
matrix's ``acc_k / branch`` target is 0.9)::

    python -m benchmarks.pair_matrix --pairs "resnet18->deit_tiny" --dump results/evidence
    python -m benchmarks.gate_ceiling results/evidence
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pnc_surgery.evidence import GateInputs
from pnc_surgery.gate import AUTO_ALTERNATIVES, SPACES, Gate

from .pair_matrix import gate_outcome, refit_gate
from .separability import linear_bound

__all__ = ["ceilings", "main"]


def _margin(gate: Gate, seen: GateInputs) -> torch.Tensor:
    """How far the best cloned class beats the target's top class in the patched logits (> 0: sent to K)."""
    with torch.no_grad():
        return gate(*seen).float().amax(1) - seen.target_logits.float().amax(1)


def _pass_at_budget(score: torch.Tensor, is_k: torch.Tensor, budget: float) -> float:
    """Share of K's inputs above the threshold that lets ``budget`` of A's inputs through."""
    threshold = torch.quantile(score[~is_k].double(), 1.0 - budget).item()
    return (score[is_k] > threshold).float().mean().item()


def _only(inputs: GateInputs, space: str) -> GateInputs:
    """``inputs`` with every novelty space but ``space`` emptied."""
    return inputs._replace(**{s: getattr(inputs, s)[:, :0] for s in SPACES if s != space})


def ceilings(dump: dict[str, Any], budget: float = 0.01, seed: int = 0) -> dict[str, Any]:
    """The gate's pass rate and its ceilings for one dumped pair (see the module docstring)."""
    evidence = {k: GateInputs(**v) if isinstance(v, dict) else v for k, v in dump["evidence"].items()}
    seen, labels, num_old = GateInputs(**dump["test"]), dump["test_labels"], int(dump["num_old"])
    is_k = labels >= num_old
    branch_right = seen.branch_logits[is_k].argmax(1) == labels[is_k] - num_old
    branch_acc = branch_right.float().mean().item()
    gate, _ = refit_gate("novelty", evidence, budget, seed, also_try=AUTO_ALTERNATIVES)
    outcome = gate_outcome(gate, seen, labels, num_old)
    row: dict[str, Any] = {
        "branch_acc_k": branch_acc,
        "gate": gate.kind,
        "gate_pass": outcome["pass_rate_k"] / branch_acc,
        "false_positive_rate": outcome["false_positive_rate"],
        "threshold_ceiling": _pass_at_budget(_margin(gate, seen), is_k, budget) / branch_acc,
    }
    for space in SPACES:
        if getattr(seen, space).shape[1]:
            alone = {k: _only(v, space) if isinstance(v, GateInputs) else v for k, v in evidence.items()}
            space_gate, _ = refit_gate("novelty", alone, budget, seed)
            row[space] = _pass_at_budget(_margin(space_gate, _only(seen, space)), is_k, budget) / branch_acc
    target_right = seen.target_logits.argmax(1) == labels
    probe = linear_bound(torch.cat([part.float() for part in seen], 1), labels, target_right, num_old, budget)
    row["linear_probe"] = sum(probe["pass_rate"].values()) / len(probe["pass_rate"]) / branch_acc
    return row


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gate_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("dumps", type=Path, help="folder of pair_matrix --dump files")
    parser.add_argument("--budget", type=float, default=0.01, help="false-positive budget (default 0.01)")
    args = parser.parse_args(argv)
    columns = ("gate_pass", "false_positive_rate", "threshold_ceiling", *SPACES, "linear_probe")
    print(f"| pair | branch_acc_k | gate | {' | '.join(columns)} |\n|{'---|' * (3 + len(columns))}")
    rows = []
    for path in sorted(args.dumps.glob("*.pt")):
        row = {"pair": path.stem.rsplit("_seed", 1)[0].replace("__", "->")}
        row.update(ceilings(torch.load(path, weights_only=False), args.budget))
        cells = [f"{row[c]:.2f}" if c in row else "–" for c in columns]
        print(f"| {row['pair']} | {row['branch_acc_k']:.3f} | {row['gate']} | {' | '.join(cells)} |", flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
