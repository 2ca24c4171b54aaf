"""The linear-gate ceiling of ``benchmarks.separability``: what it reports on data whose answer is known."""

import torch

from benchmarks.separability import linear_bound

NUM_OLD = 2


def data(shift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """400 images of each of two target classes and two cloned classes; cloned ones shifted by ``shift``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(400)
    features = torch.randn(len(labels), 6, generator=gen)
    features[labels >= NUM_OLD, 0] += shift
    return features, labels


def test_separable_cloned_classes_all_pass_and_the_ceiling_counts_them_right() -> None:
    features, labels = data(shift=20.0)
    target_correct = torch.rand(len(labels), generator=torch.Generator().manual_seed(1)) < 0.9
    bound = linear_bound(features, labels, target_correct, NUM_OLD, budget=0.01)
    assert bound["pass_rate"] == {2: 1.0, 3: 1.0}
    old = labels < NUM_OLD
    expected = ((target_correct & old).sum().item() - round(0.01 * old.sum().item()) + (~old).sum().item()) / len(
        labels
    )
    assert abs(bound["acc_all_ceiling"] - expected) <= 2 / len(labels)  # up to rounding of the 1% that pass


def test_indistinguishable_cloned_classes_pass_about_as_often_as_the_budget() -> None:
    features, labels = data(shift=0.0)
    bound = linear_bound(features, labels, torch.ones(len(labels), dtype=torch.bool), NUM_OLD, budget=0.01)
    assert all(rate <= 0.05 for rate in bound["pass_rate"].values()), bound


def test_out_of_fold_scores_do_not_reward_features_that_only_memorise() -> None:
    """Noise columns let an in-sample probe pass cloned images it cannot tell apart; out of fold they cannot."""
    features, labels = data(shift=0.0)
    noisy = torch.cat([features, torch.randn(len(labels), 400, generator=torch.Generator().manual_seed(2))], dim=1)
    everyone_right = torch.ones(len(labels), dtype=torch.bool)
    in_sample = linear_bound(noisy, labels, everyone_right, NUM_OLD, budget=0.01, strengths=(100.0,), folds=0)
    out_of_fold = linear_bound(noisy, labels, everyone_right, NUM_OLD, budget=0.01, strengths=(100.0,), folds=5)
    assert min(in_sample["pass_rate"].values()) > 0.05, in_sample
    assert max(out_of_fold["pass_rate"].values()) < 0.04, out_of_fold
