"""Specification of the gate: which inputs reach the cloned classes, and how often target-domain inputs do."""
from __future__ import annotations

import math

import pytest
import torch

from pnc_surgery import InvalidInputError, Patch
from pnc_surgery.backends.timm import create_model
from pnc_surgery.gate import Gate, _tail_quantile, evidence_width, gate_evidence

NUM_OLD, NUM_NEW, PRE_LOGITS = 5, 3, 16


def domain(count: int, classes: torch.Tensor, offset: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evidence rows of one domain: Gaussian pre-logits around class centres, with logits that follow them.

    The target recognises its own classes (centres on its axes) and the branch the cloned ones; inputs of the
    other domain sit ``offset`` away along a direction both models share."""
    gen = torch.Generator().manual_seed(seed)
    groups = classes[torch.randint(len(classes), (count,), generator=gen)]
    centres = torch.zeros(int(classes.max()) + 1, PRE_LOGITS)
    centres[torch.arange(len(centres)), torch.arange(len(centres)) % PRE_LOGITS] = 3.0
    pre_logits = centres[groups] + torch.randn(count, PRE_LOGITS, generator=gen)
    pre_logits[:, -1] += offset
    target_logits = pre_logits[:, :NUM_OLD] * 2
    branch_logits = pre_logits[:, NUM_OLD : NUM_OLD + NUM_NEW] * 2
    return gate_evidence(target_logits, branch_logits, pre_logits), groups


def cloned(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    evidence, groups = domain(count, torch.arange(NUM_OLD, NUM_OLD + NUM_NEW), offset=3.0, seed=seed)
    return evidence, groups - NUM_OLD


def target_domain(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return domain(count, torch.arange(NUM_OLD), offset=0.0, seed=seed)


def changed_answers(gate: Gate, evidence: torch.Tensor) -> torch.Tensor:
    """Rows where a cloned class would beat the target's own top class once the patch is attached."""
    target_logits = evidence[:, 5 : 5 + NUM_OLD]
    branch_logits = evidence[:, 5 + NUM_OLD : 5 + NUM_OLD + NUM_NEW]
    with torch.no_grad():
        scores = gate(target_logits, branch_logits, evidence[:, 5 + NUM_OLD + NUM_NEW :])
    return scores.amax(-1) > target_logits.amax(-1)


def fitted(positives: int, negatives: int, budget: float = 0.01, seed: int = 0) -> tuple[Gate, dict]:
    gate = Gate("learned", evidence_width(NUM_OLD, NUM_NEW, PRE_LOGITS))
    pos, pos_groups = cloned(positives, seed)
    neg, neg_groups = target_domain(negatives, seed + 1)
    return gate, gate.fit(pos, pos_groups, neg, neg_groups, max_false_positive_rate=budget, seed=seed)


def test_evidence_rows_have_the_documented_width() -> None:
    evidence, _ = target_domain(4, seed=0)
    assert evidence.shape == (4, evidence_width(NUM_OLD, NUM_NEW, PRE_LOGITS))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_gate_keeps_the_target_domain_budget_and_reports_what_passes(seed: int) -> None:
    gate, metrics = fitted(positives=2000, negatives=100, seed=seed)
    assert metrics["gate_components"] == [NUM_NEW, NUM_OLD]
    fresh_target, _ = target_domain(20000, seed=100 + seed)
    fresh_cloned, _ = cloned(2000, seed=200 + seed)
    assert changed_answers(gate, fresh_target).float().mean() <= 0.03  # budget 1%, estimated from 100 replay inputs
    passed = changed_answers(gate, fresh_cloned).float().mean().item()
    assert passed >= 0.5
    assert metrics["gate_positive_rate_heldout"] == pytest.approx(passed, abs=0.05), "the reported rate is what happens"


def test_with_few_rows_against_the_features_the_gate_still_keeps_the_budget() -> None:
    gate, _ = fitted(positives=60, negatives=40)
    fresh_target, _ = target_domain(5000, seed=7)
    fresh_cloned, _ = cloned(2000, seed=8)
    assert changed_answers(gate, fresh_target).float().mean() <= 0.05
    assert changed_answers(gate, fresh_cloned).float().mean() >= 0.15  # few rows: a careful gate, not a closed one


def test_a_larger_budget_opens_the_gate_wider() -> None:
    strict, strict_metrics = fitted(positives=2000, negatives=100, budget=0.01)
    loose, loose_metrics = fitted(positives=2000, negatives=100, budget=0.2)
    fresh_cloned, _ = cloned(2000, seed=9)
    assert loose_metrics["gate_positive_rate_heldout"] > strict_metrics["gate_positive_rate_heldout"]
    assert changed_answers(loose, fresh_cloned).sum() > changed_answers(strict, fresh_cloned).sum()


def test_without_enough_replay_data_the_gate_falls_back_to_the_energy_gap() -> None:
    gate = Gate("learned", evidence_width(NUM_OLD, NUM_NEW, PRE_LOGITS))
    pos, groups = cloned(200, seed=0)
    neg, neg_groups = target_domain(3, seed=1)
    metrics = gate.fit(pos, groups, neg, neg_groups)
    assert gate.kind == "energy" and metrics["gate"] == "energy"
    assert "no replay" in metrics["locality_protection"]
    assert 0.9 <= metrics["gate_positive_rate_clone"] <= 1.0


def test_a_gate_without_both_kinds_of_components_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="components"):
        Gate("learned", 10, num_components=2, num_positive=2)
    with pytest.raises(InvalidInputError, match="gate kind"):
        Gate("sigmoid", 10)


def test_tail_quantile_is_the_empirical_quantile_inside_the_data() -> None:
    values = torch.arange(100, dtype=torch.float32)
    assert _tail_quantile(values, 0.5) == pytest.approx(torch.quantile(values, 0.5).item())


def test_tail_quantile_extrapolates_an_exponential_tail_past_the_largest_value() -> None:
    estimates = []
    for seed in range(200):
        sample = torch.empty(100).exponential_(generator=torch.Generator().manual_seed(seed))
        estimates.append(_tail_quantile(sample, 0.999))
    true_quantile = math.log(1000)  # of the unit exponential
    assert sum(estimates) / len(estimates) == pytest.approx(true_quantile, rel=0.1)


def test_a_fitted_discriminant_gate_survives_save_and_load(tmp_path) -> None:
    """The gate's components (their number and which are the cloned classes') are part of the patch file."""
    torch.manual_seed(0)
    source = create_model("resnet18", num_classes=NUM_OLD, in_chans=1, channels=(8, 8, 16, PRE_LOGITS)).eval()
    target = create_model("resnet18", num_classes=NUM_OLD, in_chans=1, channels=(8, 8, 16, PRE_LOGITS)).eval()
    x = torch.randn(6, 1, 32, 32)
    patch = Patch.assemble(source, target, "layer3", "layer3", [0, 1, 2], source_input=x[:2], target_input=x[:2], gate="learned")
    pos, pos_groups = cloned(2000, seed=0)
    neg, neg_groups = target_domain(100, seed=1)
    assert patch.gate.fit(pos, pos_groups, neg, neg_groups)["gate"] == "learned"
    reloaded = Patch.from_pretrained(patch.save_pretrained(tmp_path / "patch"))
    assert (reloaded.gate.num_components, reloaded.gate.num_positive) == (NUM_NEW + NUM_OLD, NUM_NEW)
    with torch.no_grad():
        with patch.attached(target):
            expected = target(x)
        with reloaded.attached(target):
            got = target(x)
    assert torch.equal(got, expected)
