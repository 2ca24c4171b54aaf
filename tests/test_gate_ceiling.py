"""``benchmarks.gate_ceiling`` on gate inputs whose answer is known: which space tells K from A, and what passes."""

import torch

from benchmarks.gate_ceiling import ceilings
from pnc_surgery.evidence import GateInputs

NUM_OLD, NUM_NEW, WIDTH = 5, 3, 8


def inputs(count: int, cloned: bool, seed: int) -> tuple[GateInputs, torch.Tensor]:
    """Gate inputs where only the insertion feature says whether an input is one of K (its first coordinate), and
    the branch names every cloned input's class right; each row's class (A: 0-4, K: 5-7)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(NUM_NEW, (count,), generator=gen) + NUM_OLD if cloned else torch.randint(NUM_OLD, (count,))
    insertion = torch.randn(count, WIDTH, generator=gen)
    insertion[:, 0] += 6.0 if cloned else 0.0
    branch_logits = 5.0 * torch.eye(NUM_NEW)[(labels - NUM_OLD) % NUM_NEW] + torch.randn(count, NUM_NEW, generator=gen)
    seen = GateInputs(
        torch.randn(count, NUM_OLD, generator=gen),
        branch_logits,
        torch.randn(count, WIDTH, generator=gen),
        torch.randn(count, WIDTH, generator=gen),
        insertion,
    )
    return seen, labels


def dump() -> dict:
    """What ``pair_matrix --dump`` saves: the clone and replay evidence and a test split."""
    positives, positive_labels = inputs(300, True, seed=0)
    negatives, negative_labels = inputs(200, False, seed=1)
    test_k, labels_k = inputs(300, True, seed=2)
    test_a, labels_a = inputs(400, False, seed=3)
    return {
        "evidence": {
            "positives": positives._asdict(),
            "positive_groups": positive_labels - NUM_OLD,
            "negatives": negatives._asdict(),
            "negative_groups": negative_labels,
            "negative_sources": torch.arange(200),
        },
        "test": GateInputs.cat([test_k, test_a])._asdict(),
        "test_labels": torch.cat([labels_k, labels_a]),
        "num_old": NUM_OLD,
    }


def test_the_space_that_separates_the_domains_reaches_the_ceiling_and_the_others_do_not() -> None:
    row = ceilings(dump(), budget=0.01)
    assert row["branch_acc_k"] == 1.0
    assert row["insertion_features"] >= 0.95
    assert row["pre_logits"] <= 0.2 and row["branch_features"] <= 0.2
    assert row["threshold_ceiling"] >= 0.95 and row["linear_probe"] >= 0.95
    assert 0.9 <= row["gate_pass"] <= row["threshold_ceiling"] + 0.02
    assert row["false_positive_rate"] <= 0.03  # tests/test_gate.py: TOLERANCE x the budget in single fits
