"""Adapters: map the target's feature at the insertion point to what the cloned branch expects at the cut.

Features come in three layouts: spatial maps (``NCHW``, ``NHWC``) and token sequences (``NLC``). Image
token sequences carry a grid of patch tokens behind a few prefix tokens (cls, distillation, registers). The
adapter brings its input to a channels-first grid, changes the width with a 1x1 convolution, resamples
the grid to the branch's size, and writes the branch's layout (learned prefix tokens included). Text
tokens keep their sequence and only change width. The spec is plain JSON so a patch can rebuild its
adapter without code.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PatchMismatchError, UnsupportedModelError
from .patch.config import AdapterSpec, FeatureSpec, Layout
from .points import Point

__all__ = ["FeatureSpec", "Adapter", "feature_spec"]


def feature_spec(point: Point, input_size: tuple[int, int] | None) -> FeatureSpec:
    """Describe a point's feature; ``input_size`` is the model's image size (``None`` for text)."""
    grid = point.grid
    prefix = 0
    if point.layout == "NLC" and input_size is not None and point.reduction:
        grid = (input_size[0] // point.reduction, input_size[1] // point.reduction)
        prefix = point.shape[0] - grid[0] * grid[1]
        if prefix < 0:
            grid, prefix = None, 0
    if point.layout == "NLC" and grid is None and input_size is not None:
        side = math.isqrt(point.shape[0])
        if side * side == point.shape[0]:
            grid = (side, side)
    layout = cast(Layout, point.layout)  # Point.layout is a str checked against the same names when a Point is made
    return FeatureSpec(layout=layout, shape=point.shape, channels=point.width, grid=grid, prefix=prefix)


class Adapter(nn.Module):
    """Trainable map from the target's feature at the insertion point to the branch's input at the cut.

    Args:
        insertion: the target's feature at the insertion point.
        cut: the branch's feature at the cut.
        hidden: width of an optional residual bottleneck (``0``: a single 1x1 projection).
    """

    def __init__(self, insertion: FeatureSpec, cut: FeatureSpec, hidden: int = 0) -> None:
        super().__init__()
        if (insertion.grid is None) != (cut.grid is None):
            raise UnsupportedModelError(
                f"cannot adapt a {insertion.layout} feature {insertion.shape} to {cut.layout} {cut.shape}: one is an "
                "image "
                "feature and the other a text token sequence"
            )
        self.insertion, self.cut, self.hidden = insertion, cut, int(hidden)
        self.proj = nn.Conv2d(insertion.channels, cut.channels, kernel_size=1)
        self.bottleneck = (
            nn.Sequential(nn.Conv2d(insertion.channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, cut.channels, 1))
            if hidden
            else None
        )
        self.prefix = nn.Parameter(torch.zeros(cut.prefix, cut.channels)) if cut.prefix else None
        self.reset_identity()

    def reset_identity(self) -> None:
        """Identity where widths match (an untouched feature passes through), small random otherwise."""
        with torch.no_grad():
            if self.insertion.channels == self.cut.channels:
                self.proj.weight.copy_(torch.eye(self.cut.channels)[:, :, None, None])
            else:
                nn.init.normal_(self.proj.weight, std=self.insertion.channels**-0.5)
            assert self.proj.bias is not None, "nn.Conv2d is built with a bias"
            self.proj.bias.zero_()
            if self.bottleneck is not None:
                last = self.bottleneck[2]
                assert isinstance(last, nn.Conv2d) and last.bias is not None, "the bottleneck ends in a biased conv"
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def spec(self) -> AdapterSpec:
        """The shapes from which :meth:`from_spec` rebuilds an adapter of the same shapes."""
        return AdapterSpec(self.insertion, self.cut, self.hidden)

    @classmethod
    def from_spec(cls, spec: AdapterSpec) -> Adapter:
        return cls(spec.insertion, spec.cut, spec.hidden)

    def to_grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target feature as (B, C, H, W) (text tokens as (B, C, L, 1)), and its prefix tokens."""
        return _as_grid(x, self.insertion)

    def resample(self, grid: torch.Tensor) -> torch.Tensor:
        """A channels-first grid brought to the branch's grid size (pooled down or interpolated up)."""
        size = self.cut.grid
        if size is None or tuple(grid.shape[-2:]) == size:
            return grid
        if grid.shape[-2] >= size[0] and grid.shape[-1] >= size[1]:
            return F.adaptive_avg_pool2d(grid, size)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def fit_least_squares(self, inputs: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> None:
        """Start from the best linear map: the 1x1 projection solves ridge least squares from the target's
        features (``inputs``) to the branch's (``targets``), and prefix tokens take the targets' mean.

        Resampling is linear and acts on positions only, so it commutes with the projection and the fit is exact
        for the adapter's linear part. A randomly initialised adapter needs many steps before a shallow cut's
        feature looks like anything the branch knows; this lets a short search round rank such pairs fairly.
        """
        grid, _ = self.to_grid(inputs)
        wanted, prefix = _as_grid(targets, self.cut)
        resampled = self.resample(grid.double())
        if resampled.shape[-2:] != wanted.shape[-2:]:
            return  # text of different lengths: positions do not correspond
        x = resampled.permute(0, 2, 3, 1).reshape(-1, grid.shape[1])
        y = wanted.double().permute(0, 2, 3, 1).reshape(-1, wanted.shape[1])
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        gram = x.T @ x
        gram += (
            ridge
            * gram.diagonal()[:-1].mean().clamp_min(1e-12)
            * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        )
        solution = torch.linalg.solve(gram, x.T @ y)
        self.proj.weight.copy_(solution[:-1].T[:, :, None, None].to(self.proj.weight))
        assert self.proj.bias is not None, "nn.Conv2d is built with a bias"
        self.proj.bias.copy_(solution[-1])
        if self.prefix is not None and prefix is not None:
            self.prefix.copy_(prefix.float().mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, _ = self.to_grid(x)
        y = self.proj(grid)
        if self.bottleneck is not None:
            y = y + self.bottleneck(grid)
        y = self.resample(y)
        layout = self.cut.layout
        if layout == "NCHW":
            return y
        if layout == "NHWC":
            return y.permute(0, 2, 3, 1)
        tokens = y.flatten(2).transpose(1, 2)
        if self.prefix is not None:
            tokens = torch.cat([self.prefix.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        return tokens


def _as_grid(x: torch.Tensor, spec: FeatureSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A feature of layout ``spec`` as (B, C, H, W) (text tokens as (B, C, L, 1)), and its prefix tokens."""
    layout = spec.layout
    if tuple(x.shape[1:]) != spec.shape and not (layout == "NLC" and spec.grid is None and x.dim() == 3):
        raise PatchMismatchError(f"adapter expects a feature of shape {spec.shape}, got {tuple(x.shape[1:])}")
    if layout == "NCHW":
        return x, None
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2), None
    if spec.grid is None:
        return x.transpose(1, 2).unsqueeze(-1), None
    prefix, tokens = x[:, : spec.prefix], x[:, spec.prefix :]
    return tokens.transpose(1, 2).reshape(x.shape[0], spec.channels, *spec.grid), prefix
