"""``benchmarks.gate_ceiling`` on gate inputs whose answer is known: which space tells K from A, and what passes."""

import json
from pathlib import Path

import torch

from benchmarks.gate_ceiling import ceilings, main
from pnc_surgery.evidence import GateInputs

NUM_OLD, NUM_NEW, WIDTH = 5, 3, 8


def inputs(count: int, cloned: bool, seed: int, shift: float = 6.0) -> tuple[GateInputs, torch.Tensor]:
    """Gate inputs where only the insertion feature says whether an input is one of K (its first coordinate), and
    the branch names every cloned input's class right; each row's class (A: 0-4, K: 5-7)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(NUM_NEW, (count,), generator=gen) + NUM_OLD if cloned else torch.randint(NUM_OLD, (count,))
    insertion = torch.randn(count, WIDTH, generator=gen)
    insertion[:, 0] += shift if cloned else 0.0
    branch_logits = 5.0 * torch.eye(NUM_NEW)[(labels - NUM_OLD) % NUM_NEW] + torch.randn(count, NUM_NEW, generator=gen)
    seen = GateInputs(
        torch.randn(count, NUM_OLD, generator=gen),
        branch_logits,
        torch.randn(count, WIDTH, generator=gen),
        torch.randn(count, WIDTH, generator=gen),
        insertion,
    )
    return seen, labels


def dump(shift: float = 6.0) -> dict:
    """What ``pair_matrix --dump`` saves: the clone and replay evidence and a test split (K's inputs ``shift`` away
    from A's in the insertion feature)."""
    positives, positive_labels = inputs(300, True, seed=0, shift=shift)
    negatives, negative_labels = inputs(200, False, seed=1)
    test_k, labels_k = inputs(300, True, seed=2, shift=shift)
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
    assert row["replay_probe"] >= 0.95 and row["knn"] >= 0.95
    assert row["acc_all"] <= row["acc_all_ceiling"] + 0.02 <= row["acc_all_perfect_gate"] + 0.02
    assert 0.9 <= row["gate_pass"] <= row["threshold_ceiling"] + 0.02
    assert row["false_positive_rate"] <= 0.03  # tests/test_gate.py: TOLERANCE x the budget in single fits


def test_no_ceiling_passes_more_than_the_budget_where_nothing_tells_k_from_a() -> None:
    row = ceilings(dump(shift=0.0), budget=0.01)
    assert max(row[c] for c in ("threshold_ceiling", "linear_probe", "replay_probe", "knn")) <= 0.1
    assert row["acc_all_ceiling"] < row["acc_all_perfect_gate"] - 0.2  # the branch would be right; the gate cannot tell


def test_the_command_tabulates_every_dump_with_its_seed_and_the_mean(tmp_path: Path) -> None:
    torch.save(dump(), tmp_path / "a__b_seed3.pt")
    rows = main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert [(row["pair"], row["seed"]) for row in rows] == [("a->b", 3)]
    table = (tmp_path / "out" / "gate_ceiling.md").read_text()
    assert "| a->b | 3 |" in table and "| **mean** |" in table
    assert json.loads((tmp_path / "out" / "gate_ceiling.json").read_text())["rows"][0]["seed"] == 3
