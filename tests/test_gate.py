"""Specification of the gate: which inputs reach the cloned classes, and how often target-domain inputs do."""

from __future__ import annotations

import math

import pytest
import torch

from pnc_surgery import InvalidInputError, Patch, PatchFormatError
from pnc_surgery.backends.timm import create_model
from pnc_surgery.evidence import GateInputs
from pnc_surgery.gate import (
    NOVELTY_RANK,
    Gate,
    _ledoit_wolf_shrinkage,
    _mahalanobis,
    _tail_quantile,
    evidence_width,
    gate_evidence,
)
from pnc_surgery.patch.config import GateSpec

NUM_OLD, NUM_NEW, PRE_LOGITS, BRANCH_FEATURES, INSERTION = 5, 3, 16, 12, 16

TOLERANCE = 3.0
"""Out of sample, a gate fitted against 100 replay inputs sends on average at most its budget of fresh
target-domain inputs to a cloned class, and in single fits at most ``TOLERANCE`` x its budget (the budget is a
tail quantile estimated from 100 inputs)."""


def domain(
    count: int, classes: torch.Tensor, cloned: bool, seed: int, composition: bool = False
) -> tuple[GateInputs, torch.Tensor]:
    """Gate inputs of one domain and each row's class.

    The target recognises its own classes (pre-logit centres on its axes) and the branch the cloned ones. In the
    branch's feature space the cloned classes are tight clusters; target-domain inputs form a wide cloud around
    and between them, which no linear function of the features separates from the clusters. The pooled insertion
    feature says nothing, unless ``composition``: then the classifiers' inputs no longer tell the domains apart
    (the branch is as sure of target-domain inputs as of its own classes, as when a sentence holds one cloned
    class's keyword) and only the pooled feature does (what the input is made of)."""
    gen = torch.Generator().manual_seed(seed)
    groups = classes[torch.randint(len(classes), (count,), generator=gen)]
    centres = torch.zeros(NUM_OLD + NUM_NEW, PRE_LOGITS)
    centres[torch.arange(len(centres)), torch.arange(len(centres))] = 3.0
    pre_logits = centres[groups] + torch.randn(count, PRE_LOGITS, generator=gen)
    if cloned:
        clusters = 4.0 * torch.eye(NUM_NEW, BRANCH_FEATURES)
        branch_features = clusters[groups - NUM_OLD] + 0.5 * torch.randn(count, BRANCH_FEATURES, generator=gen)
    else:
        branch_features = 2.5 * torch.randn(count, BRANCH_FEATURES, generator=gen)
    insertion = torch.randn(count, INSERTION, generator=gen)
    if composition:
        branch_features = 4.0 * torch.eye(NUM_NEW, BRANCH_FEATURES)[groups % NUM_NEW]
        branch_features = branch_features + 0.5 * torch.randn(count, BRANCH_FEATURES, generator=gen)
        pre_logits = torch.randn(count, PRE_LOGITS, generator=gen)
        insertion[:, 0] += 3.0 if cloned else -3.0
    inputs = GateInputs(
        pre_logits[:, :NUM_OLD] * 2, branch_features[:, :NUM_NEW] * 2, pre_logits, branch_features, insertion
    )
    return inputs, groups


def cloned(count: int, seed: int, composition: bool = False) -> tuple[GateInputs, torch.Tensor]:
    inputs, groups = domain(count, torch.arange(NUM_OLD, NUM_OLD + NUM_NEW), True, seed, composition)
    return inputs, groups - NUM_OLD


def target_domain(count: int, seed: int, composition: bool = False) -> tuple[GateInputs, torch.Tensor]:
    return domain(count, torch.arange(NUM_OLD), False, seed, composition)


def changed_answers(gate: Gate, inputs: GateInputs) -> torch.Tensor:
    """Rows where a cloned class would beat the target's own top class once the patch is attached."""
    with torch.no_grad():
        scores = gate(*inputs)
    return scores.amax(-1) > inputs.target_logits.amax(-1)


def fitted(
    kind: str, positives: int, negatives: int, budget: float = 0.01, seed: int = 0, composition: bool = False
) -> tuple[Gate, dict]:
    gate = Gate.unfitted(kind, NUM_OLD, NUM_NEW, PRE_LOGITS)
    pos, pos_groups = cloned(positives, seed, composition)
    neg, neg_groups = target_domain(negatives, seed + 1, composition)
    return gate, gate.fit(pos, pos_groups, neg, neg_groups, max_false_positive_rate=budget, seed=seed)


def test_evidence_rows_have_the_documented_width() -> None:
    inputs, _ = target_domain(4, seed=0)
    assert gate_evidence(*inputs[:3]).shape == (4, evidence_width(NUM_OLD, NUM_NEW, PRE_LOGITS))


def test_on_separable_features_the_novelty_gate_passes_the_cloned_classes_within_its_budget() -> None:
    fresh_target, _ = target_domain(20000, seed=100)
    fresh_cloned, _ = cloned(2000, seed=200)
    false_positives = []
    for seed in range(10):
        gate, metrics = fitted("novelty", positives=600, negatives=100, seed=seed)
        assert metrics["gate"] == "novelty" and metrics["gate_components"] == [NUM_NEW, NUM_OLD]
        assert gate.space_widths == (PRE_LOGITS, BRANCH_FEATURES, INSERTION)
        passed = changed_answers(gate, fresh_cloned).float().mean().item()
        assert passed >= 0.9
        assert metrics["gate_positive_rate_heldout"] == pytest.approx(passed, abs=0.05), (
            "the reported rate is what happens"
        )
        false_positives.append(changed_answers(gate, fresh_target).float().mean().item())
    assert max(false_positives) <= TOLERANCE * 0.01
    assert sum(false_positives) / len(false_positives) <= 0.01


def test_where_no_hyperplane_separates_the_domains_the_novelty_gate_passes_what_the_linear_one_cannot() -> None:
    novelty, _ = fitted("novelty", positives=600, negatives=100)
    linear, _ = fitted("learned", positives=600, negatives=100)
    fresh_cloned, _ = cloned(2000, seed=9)
    assert (
        changed_answers(novelty, fresh_cloned).float().mean()
        >= changed_answers(linear, fresh_cloned).float().mean() + 0.2
    )


@pytest.mark.parametrize("kind", ["novelty", "learned"])
def test_a_larger_budget_opens_the_gate_wider(kind: str) -> None:
    strict, strict_metrics = fitted(kind, positives=600, negatives=100, budget=0.001)
    loose, loose_metrics = fitted(kind, positives=600, negatives=100, budget=0.2)
    fresh_cloned, _ = cloned(2000, seed=9)
    fresh_target, _ = target_domain(5000, seed=10)
    assert loose_metrics["gate_false_positive_rate_heldout"] > strict_metrics["gate_false_positive_rate_heldout"]
    assert changed_answers(loose, fresh_target).sum() > changed_answers(strict, fresh_target).sum()
    assert changed_answers(loose, fresh_cloned).sum() >= changed_answers(strict, fresh_cloned).sum()


def test_where_only_what_an_input_is_made_of_tells_the_domains_apart_the_novelty_gate_still_passes_them() -> None:
    gate, _ = fitted("novelty", positives=600, negatives=100, composition=True)
    linear, _ = fitted("learned", positives=600, negatives=100, composition=True)
    fresh_cloned, _ = cloned(2000, seed=9, composition=True)
    fresh_target, _ = target_domain(5000, seed=10, composition=True)
    assert changed_answers(gate, fresh_cloned).float().mean() >= 0.9
    assert changed_answers(gate, fresh_target).float().mean() <= TOLERANCE * 0.01
    assert changed_answers(linear, fresh_cloned).float().mean() < 0.5, "the classifiers' inputs alone do not tell"


def test_with_few_rows_against_the_features_the_gate_still_keeps_the_budget() -> None:
    gate, _ = fitted("novelty", positives=60, negatives=40)
    fresh_target, _ = target_domain(5000, seed=7)
    fresh_cloned, _ = cloned(2000, seed=8)
    assert changed_answers(gate, fresh_target).float().mean() <= 0.05
    assert changed_answers(gate, fresh_cloned).float().mean() >= 0.5


def test_without_features_to_measure_distances_in_the_novelty_gate_is_the_linear_one() -> None:
    pos, groups = cloned(200, seed=0)
    neg, neg_groups = target_domain(100, seed=1)
    no_features = [GateInputs(*x[:2], *(part[:, :0] for part in x[2:])) for x in (pos, neg)]
    gate = Gate.unfitted("novelty", NUM_OLD, NUM_NEW, 0)
    assert gate.fit(no_features[0], groups, no_features[1], neg_groups)["gate"] == "learned"
    assert gate.spec() == {
        "kind": "learned",
        "num_features": evidence_width(NUM_OLD, NUM_NEW, 0),
        "num_components": 8,
        "num_positive": 3,
    }


@pytest.mark.parametrize("kind", ["novelty", "learned"])
def test_without_enough_replay_data_the_gate_falls_back_to_the_energy_gap(kind: str) -> None:
    gate = Gate.unfitted(kind, NUM_OLD, NUM_NEW, PRE_LOGITS)
    pos, groups = cloned(200, seed=0)
    neg, neg_groups = target_domain(3, seed=1)
    metrics = gate.fit(pos, groups, neg, neg_groups)
    assert gate.kind == "energy" and metrics["gate"] == "energy"
    assert gate.spec()["kind"] == "energy" and "space_widths" not in gate.spec()
    assert "no replay" in metrics["locality_protection"]
    assert 0.9 <= metrics["gate_positive_rate_clone"] <= 1.0


def test_a_gate_without_both_kinds_of_components_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="components"):
        Gate("learned", 10, num_components=2, num_positive=2)
    with pytest.raises(InvalidInputError, match="gate kind"):
        Gate("sigmoid", 10)
    with pytest.raises(InvalidInputError, match="space_widths"):
        Gate("novelty", 4, num_components=8, num_positive=3, space_widths=(-1, 2))
    with pytest.raises(PatchFormatError, match="space_widths"):
        GateSpec.from_dict(
            {"kind": "novelty", "num_features": 4, "num_components": 8, "num_positive": 3, "space_widths": [-1, 2]}
        )


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


@pytest.mark.parametrize("kind", ["novelty", "learned"])
def test_a_fitted_gate_survives_save_and_load(tmp_path, kind: str) -> None:
    """The gate's components (their number, which are the cloned classes', the novelty spaces) are part of the file."""
    torch.manual_seed(0)
    source = create_model(
        "resnet18", num_classes=NUM_OLD + NUM_NEW, in_chans=1, channels=(8, 8, 16, BRANCH_FEATURES)
    ).eval()
    target = create_model("resnet18", num_classes=NUM_OLD, in_chans=1, channels=(8, 8, 16, PRE_LOGITS)).eval()
    x = torch.randn(6, 1, 32, 32)
    patch = Patch.assemble(
        source, target, "layer3", "layer3", [5, 6, 7], source_input=x[:2], target_input=x[:2], gate=kind
    )
    pos, pos_groups = cloned(600, seed=0)
    neg, neg_groups = target_domain(100, seed=1)
    assert patch.gate.fit(pos, pos_groups, neg, neg_groups)["gate"] == kind
    reloaded = Patch.from_pretrained(patch.save_pretrained(tmp_path / "patch"))
    assert reloaded.gate.spec() == patch.gate.spec()
    assert (reloaded.gate.num_components, reloaded.gate.num_positive) == (NUM_NEW + NUM_OLD, NUM_NEW)
    with torch.no_grad():
        with patch.attached(target):
            expected = target(x)
        with reloaded.attached(target):
            got = target(x)
    assert torch.equal(got, expected)


def test_a_gate_also_trying_other_kinds_keeps_the_one_that_passes_more_held_out_clone_inputs() -> None:
    pos, groups = cloned(600, seed=0)
    neg, neg_groups = target_domain(100, seed=1)
    linear = Gate.unfitted("learned", NUM_OLD, NUM_NEW, PRE_LOGITS)
    metrics = linear.fit(pos, groups, neg, neg_groups, also_try=("novelty",))
    assert set(metrics["gate_candidates"]) == {"learned", "novelty"}
    assert metrics["gate_candidates"]["novelty"] > metrics["gate_candidates"]["learned"]
    assert linear.kind == "novelty" and metrics["gate"] == "novelty"
    assert linear.space_widths == (PRE_LOGITS, BRANCH_FEATURES, INSERTION)
    alone, _ = fitted("novelty", positives=600, negatives=100)
    fresh, _ = target_domain(500, seed=5)
    with torch.no_grad():
        assert torch.equal(linear(*fresh), alone(*fresh)), "the kept gate is the one fitted alone"


@pytest.mark.parametrize(("rows", "width"), [(400, 6), (460, 1024), (50, 300)])
def test_novelty_spaces_shrink_their_covariance_by_the_ledoit_wolf_amount(rows: int, width: int) -> None:
    sklearn_covariance = pytest.importorskip("sklearn.covariance")
    residual = torch.randn(rows, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    residual[:, 0] *= 10.0
    expected = sklearn_covariance.ledoit_wolf_shrinkage(residual.numpy(), assume_centered=True)
    assert _ledoit_wolf_shrinkage(residual) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------ wide novelty spaces
def widened(inputs: GateInputs, width: int, seed: int) -> GateInputs:
    """``inputs`` with the target's pre-logits padded by noise to ``width`` (a default-width model's 512-2048)."""
    noise = torch.randn(
        len(inputs.pre_logits), width - inputs.pre_logits.shape[1], generator=torch.Generator().manual_seed(seed)
    )
    return inputs._replace(pre_logits=torch.cat([inputs.pre_logits, noise], dim=1))


def test_a_space_wider_than_the_rank_keeps_its_leading_directions_and_one_variance_for_the_rest() -> None:
    """A precision matrix grows with the width squared; past NOVELTY_RANK a space keeps that many directions. Where
    the residuals span fewer (every other variance is the shrinkage floor), its distances are the full matrix's."""
    gen = torch.Generator().manual_seed(0)
    width, span = NOVELTY_RANK + 72, 20
    mixing = torch.randn(span, width, generator=gen)
    positives, negatives = (
        torch.randn(300, span, generator=gen) @ mixing + 5.0,
        torch.randn(200, span, generator=gen) @ mixing,
    )
    groups = torch.arange(300) % 3, torch.arange(200) % 4
    wide = _mahalanobis(positives, groups[0], negatives, groups[1])
    full = _mahalanobis(positives, groups[0], negatives, groups[1], rank=width)
    assert full.rank == 0 and wide.rank == NOVELTY_RANK and wide.basis is not None
    assert torch.allclose(wide.basis.T @ wide.basis, torch.eye(NOVELTY_RANK), atol=1e-4), "orthonormal directions"
    x = 3.0 * torch.randn(50, width, generator=gen)
    torch.testing.assert_close(wide.squared_distances(x), full.squared_distances(x), rtol=2e-3, atol=1e-3)
    assert sum(t.numel() for t in wide if t is not None) < 0.7 * width**2


def test_a_gate_with_a_wide_space_passes_the_cloned_classes_and_rebuilds_from_its_spec() -> None:
    width = NOVELTY_RANK + 40
    positives, positive_groups = cloned(600, seed=0)
    negatives, negative_groups = target_domain(100, seed=1)
    gate = Gate.unfitted("novelty", NUM_OLD, NUM_NEW, width)
    gate.fit(widened(positives, width, 2), positive_groups, widened(negatives, width, 3), negative_groups, seed=0)
    assert gate.space_widths == (width, BRANCH_FEATURES, INSERTION) and gate.space_ranks == (NOVELTY_RANK, 0, 0)
    fresh = widened(cloned(2000, seed=200)[0], width, 4)
    assert changed_answers(gate, fresh).float().mean().item() >= 0.9

    rebuilt = Gate.from_spec(GateSpec.from_dict(gate.spec()).to_dict())
    rebuilt.load_state_dict(gate.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(*fresh), gate(*fresh))
    with pytest.raises(PatchFormatError, match="space_ranks"):
        GateSpec.from_dict({**gate.spec(), "space_ranks": [width, 0, 0]})
    assert "space_ranks" not in fitted("novelty", positives=600, negatives=100)[0].spec(), "narrow: as before"


@pytest.mark.parametrize("count, width", [(40, 300), (300, 16)])
def test_the_shrinkage_is_ledoit_wolfs_on_wide_and_narrow_residuals(count: int, width: int) -> None:
    """Computed from the rows' Gram matrix where there are fewer rows than features (no width x width matrix)."""
    residual = torch.randn(count, width, dtype=torch.double) @ torch.randn(width, width, dtype=torch.double)
    covariance = residual.T @ residual / count
    scale = covariance.diagonal().mean()
    spread = (covariance - scale * torch.eye(width, dtype=torch.double)).square().sum()
    each = torch.einsum("ni,nj->nij", residual, residual)  # every row's outer product
    noise = (each - covariance).square().sum() / count**2
    assert _ledoit_wolf_shrinkage(residual) == pytest.approx(float(noise.clamp(max=spread) / spread), rel=1e-9)
