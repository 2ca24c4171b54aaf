"""Specification: clone's working memory is bounded by ``CloneConfig.memory_gb``.

* ``Adapter.fit_least_squares`` streams the normal equations over chunks of rows: it gives the direct solve's answer
  whatever the chunk size, and a wide pooled feature started against a large grid fits under a small address-space
  cap (it once tried to materialise every row's resampled grid: 7.5 GB for 720 rows of 1280 channels at 32x32).
* ``clone`` sizes its feature cache, least-squares starts and branches from the one budget: candidates that cannot
  fit are skipped with a logged reason, and when none fits it says so before any training.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import TensorDataset

from pnc_surgery import CloneConfig, clone, find_points
from pnc_surgery.adapters import Adapter, FeatureSpec
from pnc_surgery.backends.timm import create_model
from pnc_surgery.errors import InvalidInputError


def _direct_solve(adapter: Adapter, inputs: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge solution (weight rows then bias) from every row's resampled grid at once, in float64."""
    grid, _ = adapter.to_grid(inputs)
    wanted = targets if adapter.cut.layout == "NCHW" else targets.permute(0, 3, 1, 2)
    x = adapter.resample(grid.double()).permute(0, 2, 3, 1).reshape(-1, grid.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = wanted.double().permute(0, 2, 3, 1).reshape(-1, wanted.shape[1])
    gram = x.T @ x
    gram += ridge * gram.diagonal()[:-1].mean() * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram, x.T @ y)


@pytest.mark.parametrize(
    ("insertion", "cut"),
    [
        (FeatureSpec("NCHW", (6, 8, 8), 6, (8, 8)), FeatureSpec("NCHW", (4, 4, 4), 4, (4, 4))),  # pooled down
        (FeatureSpec("NCHW", (6, 1, 1), 6, (1, 1)), FeatureSpec("NCHW", (4, 5, 5), 4, (5, 5))),  # 1x1 spread out
        (FeatureSpec("NCHW", (6, 3, 3), 6, (3, 3)), FeatureSpec("NHWC", (7, 7, 4), 4, (7, 7))),  # interpolated up
        (FeatureSpec("NHWC", (5, 5, 6), 6, (5, 5)), FeatureSpec("NCHW", (4, 5, 5), 4, (5, 5))),  # same grid
    ],
    ids=["pool", "spread", "interpolate", "same"],
)
@pytest.mark.parametrize("max_bytes", [1, 2**30], ids=["one-row-chunks", "one-chunk"])
def test_the_streamed_least_squares_start_equals_the_direct_solve(
    insertion: FeatureSpec, cut: FeatureSpec, max_bytes: int
) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(24, *insertion.shape, generator=generator)
    targets = torch.randn(24, *cut.shape, generator=generator)
    adapter = Adapter(insertion, cut)
    adapter.fit_least_squares(inputs, targets, ridge=1e-3, max_bytes=max_bytes)
    expected = _direct_solve(adapter, inputs, targets, ridge=1e-3).float()
    assert torch.allclose(adapter.proj.weight[:, :, 0, 0], expected[:-1].T, atol=1e-5, rtol=1e-4)
    assert torch.allclose(adapter.proj.bias, expected[-1], atol=1e-5, rtol=1e-4)


def test_the_streamed_start_keeps_the_mean_prefix_token() -> None:
    inputs = torch.randn(10, 6, 2, 2)
    targets = torch.randn(10, 5, 4)
    adapter = Adapter(FeatureSpec("NCHW", (6, 2, 2), 6, (2, 2)), FeatureSpec("NLC", (5, 4), 4, (2, 2), prefix=1))
    adapter.fit_least_squares(inputs, targets, max_bytes=1)
    assert adapter.prefix is not None
    assert torch.allclose(adapter.prefix, targets[:, :1].mean(0), atol=1e-6)


CAPPED_START = """
import resource, sys, torch
from pnc_surgery.adapters import Adapter, FeatureSpec
torch.set_num_threads(1)
inputs, targets = torch.randn(720, 1280, 1, 1), torch.randn(720, 16, 32, 32)
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))  # 1 GiB more than it holds now
adapter = Adapter(FeatureSpec("NCHW", (1280, 1, 1), 1280, (1, 1)), FeatureSpec("NCHW", (16, 32, 32), 16, (32, 32)))
adapter.fit_least_squares(inputs, targets, max_bytes=2**27)
assert torch.isfinite(adapter.proj.weight).all()
print("fitted")
"""


def test_a_wide_pooled_feature_starts_against_a_large_grid_under_an_address_space_cap() -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CAPPED_START)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "fitted" in result.stdout, result.stderr[-2000:]


@pytest.fixture(scope="module")
def pair():
    """Two small untrained timm CNNs (16 px digits-sized inputs) and 120 clone examples of 3 source classes."""
    torch.manual_seed(0)
    source, target = (create_model("resnet18", num_classes=5, in_chans=1, channels=(16, 32, 64, 128)) for _ in range(2))
    data = TensorDataset(torch.randn(120, 1, 16, 16), torch.arange(120) % 3)
    return source.eval(), target.eval(), data


TINY = {"max_cuts": 3, "max_insertions": 3, "search_steps": 1, "train_steps": 2, "keep_ratio": 0.5}


def _refusal(source, target, data, memory_gb: float) -> InvalidInputError:
    with pytest.raises(InvalidInputError, match="memory_gb") as refused:
        clone(source, target, data, config=CloneConfig(memory_gb=memory_gb, **TINY), progress=False)
    return refused.value


def test_a_budget_no_pair_fits_is_refused_before_any_feature_is_extracted(pair, monkeypatch):
    def extract(*args, **kwargs):
        raise AssertionError("features were extracted")

    monkeypatch.setattr(importlib.import_module("pnc_surgery.clone"), "_extract", extract)
    message = str(_refusal(*pair, memory_gb=1e-4))
    assert "120 examples" in message and "at least" in message


def test_the_budget_the_refusal_names_is_enough_and_leaves_out_what_does_not_fit(pair, caplog):
    source, target, data = pair
    needed = float(re.search(r"at least ([0-9.e+-]+)", str(_refusal(*pair, memory_gb=1e-4))).group(1))
    with caplog.at_level(logging.INFO, logger="pnc_surgery.clone"):
        patch = clone(source, target, data, config=CloneConfig(memory_gb=1.01 * needed, **TINY), progress=False)
    assert patch.metrics["memory_skipped"] > 0
    assert "left out of the search" in caplog.text and "memory_gb=" in caplog.text
    full = clone(source, target, data, config=CloneConfig(**TINY), progress=False)
    assert full.metrics["memory_skipped"] == 0
    assert len(patch.config.search) < len(full.config.search)
    cached = {
        name: math.prod(p.shape)
        for model, role in ((source, "cut"), (target, "insertion"))
        for name, p in ((f"{role}:{q.name}", q) for q in find_points(model, data[0][0][None]))
    }
    searched = {f"{role}:{row[role]}" for row in patch.config.search for role in ("cut", "insertion")}
    assert 4 * len(data) * sum(cached[key] for key in searched) <= 1.01 * needed * 2**30


def test_a_forced_point_that_does_not_fit_is_refused(pair):
    source, target, data = pair
    first = find_points(source, data[0][0][None])[0].name
    with pytest.raises(InvalidInputError, match=f"memory_gb=.*{first}"):
        clone(source, target, data, config=CloneConfig(memory_gb=1e-4, cut=first, **TINY), progress=False)
