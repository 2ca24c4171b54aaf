"""The benchmark's smoke configuration runs end to end and writes a sane report."""

import json
import math

import pytest

from benchmarks.run import SMOKE, main


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    main(["--smoke", "--out", str(out), "--cache", str(out / "cache"), "--quiet"])
    return out


def test_report_files_exist(smoke):
    for name in ("results.json", "results.md", "accuracy_vs_locality.png", "cost.png"):
        assert (smoke / name).stat().st_size > 0, name


def test_every_method_has_a_row(smoke):
    document = json.loads((smoke / "results.json").read_text())
    rows = document["rows"]
    expected = {(pair, method) for pair in SMOKE.pairs for method in SMOKE.methods}
    assert {(r["pair"], r["method"]) for r in rows} == expected
    table = (smoke / "results.md").read_text()
    assert all(f"| {method} |" in table for method in SMOKE.methods)
    assert "same replay set" in table


def test_numbers_are_sane(smoke):
    rows = json.loads((smoke / "results.json").read_text())["rows"]
    for row in rows:
        for key in ("acc_old", "acc_new", "acc_all", "locality"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
        assert row["latency_vs_target"] > 0 and row["extra_params"] > 0 and row["patch_bytes"] > 0
        assert row["clone_images"] == rows[0]["clone_images"] and row["replay_images"] == rows[0]["replay_images"]
    by_method = {(r["pair"], r["method"]): r for r in rows}
    for pair in SMOKE.pairs:
        for method in ("pnc", "pnc_no_localize", "pnc_last_stage", "pnc_no_gate", "ensemble"):
            assert by_method[pair, method]["target_params_changed"] == 0, (pair, method)
            assert by_method[pair, method]["detach_max_abs_diff"] == 0.0, (pair, method)
        for method in ("finetune", "lwf", "ewc", "lora"):
            assert by_method[pair, method]["target_params_changed"] > 0, (pair, method)
        assert by_method[pair, "finetune"]["detach_max_abs_diff"] is None
        assert not math.isinf(by_method[pair, "lora"]["detach_max_abs_diff"])
        assert by_method[pair, "pnc"]["extra_params"] < by_method[pair, "ensemble"]["extra_params"]


def test_pnc_rows_break_the_patch_file_down_by_part(smoke):
    rows = json.loads((smoke / "results.json").read_text())["rows"]
    for row in (r for r in rows if r["method"].startswith("pnc")):
        parts = row["notes"]["patch_part_bytes"]
        assert {"branch", "adapter", "gate"} <= set(parts) and all(size > 0 for size in parts.values()), parts
        assert sum(parts.values()) < row["patch_bytes"], "the file adds its header and config to the tensors"
