"""Specification of what ``clone()`` refuses, and when: every input is checked before any training starts, with a
library error that says what is wrong (issue 14, items 2, 10 and 14).

* Non-finite data (NaN pixels, in the clone data or the replay data) and non-finite or degenerate settings
  (``lr=nan``, ``temperature=0``) are refused, as is a class with a single example.
* Replay data the target cannot take (3-channel images for a 1-channel target) is refused before training, not
  after it.
* Wrong types (string labels, ``batch_size="64"``, ``adapter_hidden=-4``) raise :class:`InvalidInputError`, never a
  raw Python error, and a huge ``classes`` list gives a short message.
* A training that diverges raises :class:`CloneError`: ``clone()`` never returns a patch with non-finite tensors.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from pnc_surgery import CloneConfig, CloneError, InvalidInputError, clone
from pnc_surgery.backends.timm import create_model

clone_module = importlib.import_module("pnc_surgery.clone")  # the package exports the function under the same name
TINY = CloneConfig(max_cuts=1, max_insertions=1, search_steps=2, train_steps=4, localize=False)


def _model(num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(num_classes)
    return create_model("resnet18", num_classes=num_classes, in_chans=1, channels=(8, 8, 16, 16)).eval()


def _data(count: int = 12, classes: int = 2) -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(1, 16, 16, generator=generator), i % classes) for i in range(count)]


@pytest.fixture()
def no_training(monkeypatch):
    """Fail the test if any training starts: refusals must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the inputs were checked")

    monkeypatch.setattr(clone_module, "successive_halving", refuse)
    monkeypatch.setattr(clone_module, "train_candidate", refuse)
    monkeypatch.setattr(clone_module, "prepare", refuse)


def test_a_single_example_is_refused_before_training(no_training):
    with pytest.raises(InvalidInputError, match="at least 2"):
        clone(_model(), _model(5), [(torch.randn(1, 16, 16), 0)], config=TINY, progress=False)


def test_nan_pixels_in_the_clone_data_are_refused_before_training(no_training):
    data = _data()
    data[3] = (torch.full((1, 16, 16), math.nan), 1)
    with pytest.raises(InvalidInputError, match="NaN"):
        clone(_model(), _model(5), data, config=TINY, progress=False)


@pytest.mark.parametrize(
    "setting",
    [
        {"lr": math.nan},
        {"temperature": 0.0},
        {"branch_lr": math.inf},
        {"cost_weight": -1.0},
        {"keep_ratios": (0.5, math.nan)},
        {"max_branch_share": 0.0},
        {"max_branch_share": 1.5},
        {"max_branch_share": "small"},
    ],
)
def test_non_finite_or_degenerate_settings_are_refused(setting):
    with pytest.raises(InvalidInputError, match=next(iter(setting))):
        CloneConfig(**setting)


@pytest.mark.parametrize(
    "setting",
    [{"adapter_hidden": -4}, {"batch_size": "64"}, {"train_steps": 2.5}, {"localize": "no"}, {"budget": "huge"}],
)
def test_settings_of_the_wrong_type_raise_library_errors(setting):
    with pytest.raises(InvalidInputError, match=next(iter(setting))):
        CloneConfig(**setting)


def test_replay_images_the_target_cannot_take_are_refused_before_training(no_training):
    replay = [(torch.randn(3, 16, 16),) for _ in range(4)]
    with pytest.raises(InvalidInputError, match="replay"):
        clone(_model(), _model(5), _data(), replay=replay, config=TINY, progress=False)


def test_nan_replay_is_refused_before_training(no_training):
    replay = [(torch.randn(1, 16, 16),) for _ in range(4)] + [(torch.full((1, 16, 16), math.nan),)]
    with pytest.raises(InvalidInputError, match=r"replay.*NaN"):
        clone(_model(), _model(5), _data(), replay=replay, config=TINY, progress=False)


def test_string_labels_raise_a_library_error(no_training):
    data = [(x, "cat" if y else "dog") for x, y in _data()]
    with pytest.raises(InvalidInputError, match="labels"):
        clone(_model(), _model(5), data, config=TINY, progress=False)


def test_a_huge_classes_list_gives_a_short_message(no_training):
    with pytest.raises(InvalidInputError) as error:
        clone(_model(), _model(5), _data(), classes=list(range(10**6)), config=TINY, progress=False)
    assert len(str(error.value)) < 500


DIVERGING = dict(search_steps=2, train_steps=4, localize=False, lr=1e30, branch_lr=1e30, gate="energy")


def test_a_training_that_leaves_non_finite_weights_raises_instead_of_returning_them(monkeypatch):
    def overflowing(candidate, *args, **kwargs):  # what reduced precision or a wild learning rate can leave behind
        with torch.no_grad():
            next(candidate.adapter.parameters()).fill_(math.nan)

    monkeypatch.setattr(clone_module, "train_candidate", overflowing)
    config = CloneConfig(max_cuts=1, max_insertions=1, train_steps=4, localize=False, gate="energy")
    with pytest.raises(CloneError, match="NaN or infinite"):
        clone(_model(), _model(5), _data(), config=config, progress=False)


def test_a_diverging_final_training_gives_back_the_patch_it_started_from():
    config = CloneConfig(max_cuts=1, max_insertions=1, **DIVERGING)  # one pair: no search, a least-squares start
    patch = clone(_model(), _model(5), _data(), config=config, progress=False)
    assert all(bool(torch.isfinite(t).all()) for t in patch.tensors().values() if t.is_floating_point())
