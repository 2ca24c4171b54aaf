"""Specification of the (cut, insertion) search's building blocks: which points are searched and how every
candidate adapter starts.

* ``spread_points`` spans a model's whole depth (its first stage end and its last point included), takes stage
  ends before other points, and never returns more points than asked.
* ``Adapter.fit_least_squares`` starts an adapter from the best linear map between the two features, across
  layouts and grid sizes, so that a short search round ranks a shallow pair by what it can do rather than by how
  far a random start is from it.
* ``ranked`` orders scored pairs: within one standard error of the best (from the held-out size) the cheapest
  first, at equal cost the lower held-out loss; a clearly more accurate pair wins whatever it costs.
* ``successive_halving`` trains the best pair of every cut before judging it.
* ``train_candidate`` with held-out scoring never ends worse than it started.
"""

from __future__ import annotations

import pytest
import torch

from pnc_surgery.adapters import Adapter, FeatureSpec
from pnc_surgery.points import Point
from pnc_surgery.search import (
    Candidate,
    FitData,
    ranked,
    spread_points,
    standard_error,
    successive_halving,
    train_candidate,
)


def _cnn_points() -> list[Point]:
    """A resnet-like model at 16 px: a stem, stages that halve the grid down to 1x1, then global pooling."""
    shapes = [(16, 8, 8)] * 3 + [(16, 4, 4)] * 3 + [(32, 2, 2)] * 2 + [(64, 1, 1)] * 2 + [(128, 1, 1)] * 3
    names = [
        "conv1",
        "bn1",
        "act1",
        "maxpool",
        "layer1.0",
        "layer1",
        "layer2.0",
        "layer2",
        "layer3.0",
        "layer3",
        "layer4.0",
        "layer4",
        "global_pool",
    ]
    return [Point(n, i, s, "NCHW", 16 // s[1], s[0]) for i, (n, s) in enumerate(zip(names, shapes))]


def _isotropic_points(blocks: int = 8) -> list[Point]:
    """A ViT-like model: one patch embedding, then blocks that all keep the token shape."""
    embedding = [Point("patch_embed", 0, (17, 32), "NLC", 4, 32)]
    return embedding + [Point(f"blocks.{i}", i + 1, (17, 32), "NLC", 4, 32) for i in range(blocks)]


@pytest.mark.parametrize("count", [2, 3, 4])
def test_the_search_spans_the_whole_depth_and_prefers_stage_ends(count):
    points = _cnn_points()
    chosen = [p.name for p in spread_points(points, count)]
    stage_ends = {"act1", "layer1", "layer2", "layer3", "global_pool"}
    assert len(chosen) == count
    assert chosen[0] == "act1", (
        "the earliest stage end is searched: a late insertion may have lost what the classes need"
    )
    assert chosen[-1] == "global_pool", "the last point is always searched"
    assert set(chosen) <= stage_ends
    assert chosen == sorted(chosen, key=[p.name for p in points].index)


def test_isotropic_models_are_searched_at_evenly_spaced_blocks():
    chosen = [p.name for p in spread_points(_isotropic_points(), 3)]
    assert chosen == ["patch_embed", "blocks.3", "blocks.7"]


def test_a_model_with_few_points_is_searched_everywhere():
    points = _cnn_points()[:2]
    assert spread_points(points, 3) == points


def _random_map(channels_in: int, channels_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(channels_out, channels_in, generator=generator), torch.randn(channels_out, generator=generator)


def test_the_least_squares_start_recovers_a_linear_map_across_grid_sizes():
    weight, bias = _random_map(6, 4)
    inputs = torch.randn(64, 6, 8, 8)
    pooled = torch.nn.functional.adaptive_avg_pool2d(inputs, (4, 4))
    targets = torch.einsum("oc,bchw->bohw", weight, pooled) + bias[:, None, None]
    adapter = Adapter(FeatureSpec("NCHW", (6, 8, 8), 6, (8, 8)), FeatureSpec("NCHW", (4, 4, 4), 4, (4, 4)), hidden=8)
    adapter.fit_least_squares(inputs, targets, ridge=1e-9)
    assert torch.allclose(adapter(inputs), targets, atol=1e-3)


def test_the_least_squares_start_maps_a_cnn_feature_to_vit_tokens_with_their_cls_token():
    weight, bias = _random_map(6, 4)
    inputs = torch.randn(64, 6, 2, 2)
    cls = torch.randn(4)
    tokens = (torch.einsum("oc,bchw->bhwo", weight, inputs) + bias).flatten(1, 2)
    targets = torch.cat([cls.expand(64, 1, 4), tokens], dim=1)
    adapter = Adapter(FeatureSpec("NCHW", (6, 2, 2), 6, (2, 2)), FeatureSpec("NLC", (5, 4), 4, (2, 2), prefix=1))
    adapter.fit_least_squares(inputs, targets, ridge=1e-9)
    assert torch.allclose(adapter(inputs), targets, atol=1e-3)


def test_the_least_squares_start_leaves_text_of_other_lengths_alone():
    adapter = Adapter(FeatureSpec("NLC", (7, 6), 6, None), FeatureSpec("NLC", (9, 4), 4, None))
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    adapter.fit_least_squares(torch.randn(8, 7, 6), torch.randn(8, 9, 4))
    assert all(torch.equal(before[k], v) for k, v in adapter.state_dict().items())


def _candidate(cut: str, insertion: str, accuracy: float, cost: float, loss: float = 0.5, weight: float = 0.02):
    """A scored candidate without a model: ranking reads only its points, accuracy, loss and cost."""
    points = {name: Point(name, i, (8, 4, 4), "NCHW", 4, 8) for i, name in enumerate((cut, insertion))}
    candidate = Candidate(points[cut], points[insertion], None, None, cost=cost, cost_weight=weight)  # type: ignore[arg-type]
    candidate.accuracy, candidate.loss = accuracy, loss
    return candidate


HELDOUT = 72
"""Held-out examples of the benchmark's digits split (20% of 361 clone images)."""


def test_the_standard_error_shrinks_with_the_held_out_size_and_stays_positive_at_a_perfect_score():
    assert standard_error(0.97, 21) > standard_error(0.97, 72) > standard_error(0.97, 720) > 0
    assert standard_error(1.0, 21) > 0.04, "21 perfect answers do not prove a perfect pair"


def test_of_two_pairs_whose_accuracies_are_within_the_noise_the_cheaper_wins():
    whole_source = _candidate("patch_embed", "norm", accuracy=0.97, cost=0.99)
    one_block = _candidate("blocks.2", "norm", accuracy=0.95, cost=0.25)
    assert standard_error(0.97, HELDOUT) > 0.97 - 0.95
    assert ranked([whole_source, one_block], HELDOUT)[0] is one_block


def test_a_pair_clearly_more_accurate_wins_whatever_it_costs():
    whole_source = _candidate("patch_embed", "norm", accuracy=0.97, cost=0.99)
    one_block = _candidate("blocks.2", "norm", accuracy=0.82, cost=0.25)
    assert ranked([one_block, whole_source], HELDOUT)[0] is whole_source


def test_between_pairs_of_one_cut_scored_alike_the_lower_held_out_loss_wins():
    pooled = _candidate("layer4.0", "global_pool", accuracy=1.0, cost=0.32, loss=0.56)
    stem = _candidate("layer4.0", "act1", accuracy=0.95, cost=0.32, loss=0.46)
    assert ranked([pooled, stem], 21)[0] is stem


def test_without_a_cost_weight_the_cost_is_ignored():
    whole_source = _candidate("patch_embed", "norm", accuracy=0.97, cost=0.99, loss=0.2, weight=0.0)
    one_block = _candidate("blocks.2", "norm", accuracy=0.96, cost=0.25, loss=0.6, weight=0.0)
    assert ranked([one_block, whole_source], HELDOUT)[0] is whole_source


def test_round_zero_trains_every_cut_before_judging_it(monkeypatch):
    """Untrained, a cut right after a linear patch embedding is reached almost exactly by the least-squares start
    and outscores a deeper cut that training would make as good: every cut's best pair is trained."""
    import pnc_surgery.search as search

    untrained = {("patch_embed", "a"): 0.99, ("patch_embed", "b"): 0.98, ("patch_embed", "c"): 0.97}
    untrained[("blocks.2", "a")] = 0.5
    candidates = [
        _candidate(cut, insertion, float("nan"), cost)
        for (cut, insertion), cost in zip(untrained, (0.99, 0.99, 0.99, 0.25))
    ]

    def evaluate(candidate, data, temperature, feature_weight):
        key = (candidate.cut.name, candidate.insertion.name)
        return (untrained[key] if candidate.steps == 0 else 0.96), 0.5

    def train(candidate, data, steps, **kwargs):
        candidate.steps += steps

    monkeypatch.setattr(search, "evaluate", evaluate)
    monkeypatch.setattr(search, "train_candidate", train)
    winner, ranking = successive_halving(
        candidates,
        lambda c: list(range(HELDOUT)),
        lambda c: list(range(HELDOUT)),
        first_steps=1,
        lr=1e-3,
        batch_size=8,
        temperature=1.0,
        feature_weight=0.0,
        generator=torch.Generator(),
        survivors=2,
        progress=False,
    )
    assert winner.cut.name == "blocks.2", ranking
    assert [row["cut"] for row in ranking].count("patch_embed") == 3


def test_a_feature_only_laid_out_anew_is_searched_once():
    projection = Point("patch_embed.proj", 0, (32, 4, 4), "NCHW", 4, 32)
    tokens = Point("patch_embed", 1, (16, 32), "NLC", 4, 32)
    blocks = [Point(f"blocks.{i}", i + 2, (17, 32), "NLC", 4, 32) for i in range(4)]
    chosen = [p.name for p in spread_points([projection, tokens, *blocks], 3)]
    assert "patch_embed.proj" not in chosen, "the projection's output and the tokens are one feature"
    assert chosen[0] == "patch_embed"


def test_a_final_training_that_only_hurts_gives_back_the_starting_weights():
    """A branch fine-tuning that diverges (here a learning rate of 1e4) must not leave the patch worse than the search
    handed it over: the held-out score of the starting weights competes with every later one."""
    torch.manual_seed(0)
    adapter = Adapter(FeatureSpec("NCHW", (4, 4, 4), 4, (4, 4)), FeatureSpec("NCHW", (4, 4, 4), 4, (4, 4)), hidden=0)
    branch = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    point = Point("layer1", 0, (4, 4, 4), "NCHW", 4, 4)
    candidate = Candidate(point, point, branch, adapter)  # type: ignore[arg-type]
    features, labels = torch.randn(48, 4, 4, 4), torch.arange(48) % 3
    data = FitData(features, features, torch.nn.functional.one_hot(labels, 3).float() * 5, labels)
    start = [p.detach().clone() for p in [*adapter.parameters(), *branch.parameters()]]
    train_candidate(
        candidate,
        data,
        20,
        lr=1e4,
        batch_size=16,
        temperature=2.0,
        feature_weight=1.0,
        generator=torch.Generator().manual_seed(0),
        branch_lr=1e4,
        heldout=data,
        eval_every=2,
        patience=3,
    )
    end = [*adapter.parameters(), *branch.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(start, end))
    assert candidate.steps == 6, "three evaluations without improvement stop it"
