"""The test zoo keeps its promises: every model builds fast, answers with logits, and its ``not_points`` are
really not cuts (so the tests that forbid them as points are right to)."""

from __future__ import annotations

import time

import pytest
import torch
from zoo import NUM_CLASSES, ZOO, build, cut_error, logits_of, run_model


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_builds_in_eval_mode_and_answers_logits(name: str) -> None:
    start = time.perf_counter()
    model, example = build(name)
    with torch.no_grad():
        logits = logits_of(run_model(model, example))
    assert time.perf_counter() - start < 5.0, f"{name} is too slow for the test zoo"
    assert not any(m.training for m in model.modules()), f"{name} is not in eval mode"
    assert logits.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_not_points_are_not_cuts(name: str) -> None:
    model, example = build(name)
    modules = dict(model.named_modules())
    for module_name in ZOO[name].not_points:
        assert module_name in modules, f"{name}: {module_name} is not a module name"
        error = cut_error(model, module_name, example)
        assert error > 0.05, f"{name}: {module_name} is a cut (relative error {error:.2g}); pick another non-point"


def test_zoo_text_examples_have_a_padded_row() -> None:
    for name, entry in ZOO.items():
        if entry.text:
            _, example = build(name)
            mask = example["attention_mask"]
            assert mask[0].all() and not mask[1].all(), name


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_logits_depend_on_the_input(name: str) -> None:
    """Tests compare logits with atol 1e-5: that only means something if other inputs move the logits far more."""
    from zoo import other_input

    model, example = build(name)
    with torch.no_grad():
        first = logits_of(run_model(model, example))
        second = logits_of(run_model(model, other_input(example)))
    assert (second - first).abs().max() > 1e-2, f"{name}: logits barely depend on the input"
    assert (first[0] - first[1]).abs().max() > 1e-2, f"{name}: both example rows give the same logits"
