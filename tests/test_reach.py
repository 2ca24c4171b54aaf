"""The reach benchmark's smoke: five models of different families, each with >= 3 points that an independent
substitution test (written in the benchmark, not the library) confirms, spread over the depth."""

from __future__ import annotations

import pytest

from benchmarks.reach import run_one, table

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
    assert row["thirds"] == [0, 1, 2]


def test_table_counts_statuses_and_leaves_unbuildable_models_out() -> None:
    rows = {
        "timm:a": {"key": "timm:a", "status": "ok", "points": 4, "valid": 4, "thirds": [0, 1, 2], "invalid": {}},
        "timm:b": {"key": "timm:b", "status": "refused", "reason": "UnsupportedModelError: no classifier"},
        "hf:C": {"key": "hf:C", "status": "unbuildable", "reason": "TypeError: x"},
    }
    text = table(rows)
    assert "2 models counted, 1 not buildable" in text
    assert "ok 1/2 (50.0%); refused 1, unbuildable 1" in text
    assert "| timm:b |  | refused |" in text and "no classifier" in text
