"""The reach benchmark's smoke: five models of different families, each with >= 3 points that an independent
substitution test (written in the benchmark, not the library) confirms, spread over the depth."""

from __future__ import annotations

import pytest

from benchmarks.reach import largest_gap, run_one, table

SMOKE = (
    "timm:test_vit",
    "timm:test_convnext",  # layer scale starts at 1e-6: a skip-path module must not pass for a cut
    "timm:test_efficientnet",
    "hf:GPT2ForSequenceClassification",  # pools the last non-pad token of a padded batch
    "hf:ViTForImageClassification",
)


@pytest.mark.parametrize("key", SMOKE)
def test_smoke_model_gets_valid_points_spread_over_its_depth(key: str) -> None:
    row = run_one(key)
    assert row["status"] == "ok", row
    assert row["valid"] == row["points"] >= 3 and not row["invalid"]
    assert largest_gap(row) <= 0.5


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
