"""The reach benchmark's smoke: five models of different families, each with >= 3 points that an independent
substitution test (written in the benchmark, not the library) confirms, spread over the depth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.reach import (
    NUM_CLASSES,
    build_transformers,
    check_points,
    exhaustive_check,
    exhaustive_table,
    flop_depths,
    largest_gap,
    run_one,
    table,
)

SMOKE = (
    "timm:test_vit",
    "timm:test_convnext",  # layer scale starts at 1e-6: a skip-path module must not pass for a cut
    "timm:test_efficientnet",
    "hf:GPT2ForSequenceClassification",  # pools the last non-pad token of a padded batch
    "hf:ViTForImageClassification",
    "hf:BartForSequenceClassification",  # a decoder point whose branch computes the encoder from the ids
)


@pytest.mark.parametrize("key", SMOKE)
def test_smoke_model_gets_valid_points_spread_over_its_depth(key: str) -> None:
    row = run_one(key)
    assert row["status"] == "ok", row
    assert row["valid"] == row["points"] >= 3 and not row["invalid"]
    assert largest_gap(row) <= 0.5


def test_a_point_that_reads_the_ids_is_confirmed_only_with_the_modules_its_branch_computes_live() -> None:
    """The independent check keeps the encoder a decoder point lists as live; without it, the same point fails."""
    from pnc_surgery import find_points

    model, example, _ = build_transformers("BartForSequenceClassification")
    point = next(p for p in find_points(model, example) if p.live)
    assert point.name.startswith("model.decoder.") and any(n.startswith("model.encoder.") for n in point.live)
    with_live = check_points(model, example, [point.name], reading={point.name: point.live})
    without = check_points(model, example, [point.name], reading={point.name: ()})
    assert with_live[point.name]["error"] <= 1e-3 < without[point.name]["error"]


def test_table_counts_statuses_and_leaves_unbuildable_models_out() -> None:
    checked = {"points": 4, "valid": 4, "invalid": {}, "names": ["a", "b", "c", "d"]}
    rows = {
        "timm:a": {"key": "timm:a", "status": "ok", **checked, "depths": [0.1, 0.4, 0.7, 0.9]},
        "timm:b": {"key": "timm:b", "status": "refused", "reason": "UnsupportedModelError: no classifier"},
        "timm:c": {"key": "timm:c", "status": "ok", **checked, "depths": [0.1, 0.2, 0.3, 0.9], "reasons": "why"},
        "hf:C": {"key": "hf:C", "status": "unbuildable", "reason": "TypeError: x"},
    }
    text = table(rows)
    assert "3 models counted, 1 not buildable" in text
    assert "ok 1/3 (33.3%); few 1, refused 1, unbuildable 1" in text, "a 0.6 gap over the depth is not spread"
    assert "| timm:b |  | refused |" in text and "no classifier" in text
    assert "| timm:c |  | few | 4 | 4 | 0.60 |" in text and "why" in text


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


def _toy() -> tuple[nn.Module, torch.Tensor]:
    """stem, residual block, conv, pooled head: each top-level map is a cut, the residual's inner conv is not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        _Residual(8),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )
    return model.eval(), torch.randn(2, 3, 8, 8)


def test_exhaustive_check_tests_every_module_called_once_and_marks_those_a_point_can_express() -> None:
    model, example = _toy()
    result = exhaustive_check(model, example)
    assert result["tested"] == 7, "six modules and the residual's inner conv; the model itself is not tested"
    passed = result["passed"]
    assert "1.inner" not in passed, "a conv inside a residual block is not a cut"
    assert {n for n, p in passed.items() if p["point"]} == {"0", "1", "2", "3"}, "maps before the classifier only"
    assert not passed["4"]["point"] and passed["4"]["shape"] == [2, 8], "flat features pass but are no point"
    assert passed["0"]["flop_depth"] < passed["1"]["flop_depth"] < passed["2"]["flop_depth"] < 1
    shaped = exhaustive_check(model, example, point_shaped=True)
    assert shaped["tested"] == 5 and set(shaped["passed"]) == {"0", "1", "2", "3"}


def test_exhaustive_table_says_when_find_points_missed_cuts_that_would_spread() -> None:
    model, example = _toy()
    checked = {"timm:toy": {"key": "timm:toy", "status": "checked", **exhaustive_check(model, example)}}
    missed = exhaustive_table(checked, {"timm:toy": {"names": ["0"]}})
    assert "rank: MISSED cuts" in missed and "| 1, 2, 3 |" in missed
    complete = exhaustive_table(checked, {"timm:toy": {"names": ["0", "1", "2", "3"]}})
    assert "rank: offered enough" in complete


def test_flop_depths_are_the_share_of_the_forward_flops_done_when_each_module_completes() -> None:
    model, example = _toy()
    depths = flop_depths(model, example)
    convs = [depths[n] for n in ("0", "1.inner", "1", "2")]
    assert convs == sorted(convs) and depths["1.inner"] == depths["1"], "the residual add is no FLOP"
    assert depths["0"] == pytest.approx(3 / 19, abs=0.01), "convs of 3, 8 and 8 input channels; the head hardly counts"
    assert depths[""] == 1.0


def test_table_counts_the_rows_by_both_depth_measures() -> None:
    checked = {"points": 3, "valid": 3, "invalid": {}, "names": ["a", "b", "c"], "status": "ok"}
    rows = {
        "timm:a": {"key": "timm:a", **checked, "depths": [0.1, 0.2, 0.3], "flop_depths": [0.2, 0.5, 0.9]},
        "timm:b": {"key": "timm:b", **checked, "depths": [0.3, 0.6, 0.9], "flop_depths": [0.7, 0.8, 0.9]},
        "timm:c": {"key": "timm:c", **checked, "depths": [0.3, 0.6, 0.9]},
    }
    text = table(rows)
    assert "spread by rank among module completions: ok 2/3 (66.7%); few 1" in text
    assert "spread by share of the FLOPs (2 rows with FLOP depths): ok 1/2 (50.0%); few 1" in text
