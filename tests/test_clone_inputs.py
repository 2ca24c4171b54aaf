"""Specification of how each model gets its own inputs (issue 15, item 1): the clone data is in the target's format,
and the source is fed *its* format, never the target's pixels as they are.

* When both models record their normalisation (timm's data config) and the two differ, the source sees the pixels
  normalised again with its own statistics; with the same statistics it sees the data unchanged.
* ``source_transform=`` replaces that mapping; one that fails, or gives inputs the source cannot take, is refused
  before any training.
"""

from __future__ import annotations

import pytest
import torch

from pnc_surgery import CloneConfig, InvalidInputError, clone
from pnc_surgery.backends.timm import TimmBackend, create_model
from pnc_surgery.data import source_transform

TINY = CloneConfig(max_cuts=1, max_insertions=1, search_steps=2, train_steps=4, localize=False, gate="energy")


def _model(num_classes: int, seed: int, mean: float | None = None, std: float | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("resnet18", num_classes=num_classes, in_chans=1, channels=(8, 8, 16, 16)).eval()
    if mean is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": (mean,) * 3, "std": (std,) * 3}
    return model


def _constant_data(value: float, count: int = 8) -> list[tuple[torch.Tensor, int]]:
    return [(torch.full((1, 16, 16), value), i % 2) for i in range(count)]


def _source_inputs(source: torch.nn.Module) -> list[torch.Tensor]:
    """Record what the source's stem receives during a clone."""
    seen: list[torch.Tensor] = []
    source.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def test_a_source_with_other_statistics_gets_its_own_normalisation():
    target = _model(5, 1, mean=0.2, std=0.1)
    source = _model(4, 0, mean=0.5, std=0.25)
    seen = _source_inputs(source)
    clone(source, target, _constant_data(3.0), config=TINY, progress=False)  # pixel 0.2 + 3.0 * 0.1 = 0.5
    assert any(torch.allclose(x, torch.zeros_like(x), atol=1e-5) for x in seen if x.shape[0] == 8), (
        "the source must see (0.5 - 0.5) / 0.25 = 0, not the target's 3.0"
    )
    extracted = [x for x in seen if x.shape[0] == 8]  # the feature extraction's batch (checks use two examples)
    assert not any(torch.allclose(x, torch.full_like(x, 3.0)) for x in extracted), (
        "the target's pixels reached the source"
    )


def test_models_with_the_same_statistics_share_the_data_unchanged():
    backend = TimmBackend()
    source, target = _model(4, 0), _model(5, 1)
    sample = torch.randn(2, 1, 16, 16)
    assert source_transform(source, backend, sample, backend.normalization(target)) is None


def test_a_source_transform_replaces_the_automatic_mapping():
    source, target = _model(4, 0, mean=0.5, std=0.25), _model(5, 1, mean=0.2, std=0.1)
    seen = _source_inputs(source)
    clone(source, target, _constant_data(3.0), config=TINY, progress=False, source_transform=lambda x: x * 0 + 7.0)
    assert any(torch.allclose(x, torch.full_like(x, 7.0)) for x in seen if x.shape[0] == 8)


@pytest.mark.parametrize(
    "transform, message",
    [
        (lambda x: x[:, :, :0], "cannot run"),
        (lambda x: 1 / 0, "ZeroDivisionError"),
        ("resize", "callable"),
    ],
)
def test_a_source_transform_that_does_not_work_is_refused(transform, message):
    with pytest.raises(InvalidInputError, match=message):
        clone(_model(4, 0), _model(5, 1), _constant_data(1.0), config=TINY, progress=False, source_transform=transform)
