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
    def fit_least_squares(
        self, inputs: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3, max_bytes: int = 2**28
    ) -> None:
        """Start from the best linear map: the 1x1 projection solves ridge least squares from the target's
        features (``inputs``) to the branch's (``targets``), and prefix tokens take the targets' mean.

        Resampling is linear and acts on positions only, so it commutes with the projection and the fit is exact
        for the adapter's linear part. A randomly initialised adapter needs many steps before a shallow cut's
        feature looks like anything the branch knows; this lets a short search round rank such pairs fairly.

        The normal equations are accumulated over chunks of rows (in float64), so the working memory stays near
        ``max_bytes`` (see :meth:`least_squares_bytes`) whatever the number of rows; a grid brought up to a larger
        one is never materialised (its products go through the resampling's position matrix instead).
        Inputs and targets may live on another device than the adapter: one chunk at a time moves to it.
        """
        device = self.proj.weight.device
        width, out_width = self.insertion.channels, self.cut.channels
        gram = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=device)
        cross = torch.zeros(width + 1, out_width, dtype=torch.float64, device=device)
        resampling: torch.Tensor | None = None  # R: (P_out, P_in), when resampling enlarges the grid
        prefix_sum: torch.Tensor | None = None
        rows = max(1, max_bytes // max(self.least_squares_bytes(), 1))
        for start in range(0, len(inputs), rows):
            grid, _ = self.to_grid(inputs[start : start + rows].to(device))
            wanted, prefix = _as_grid(targets[start : start + rows].to(device), self.cut)
            if self.cut.grid is None and grid.shape[-2:] != wanted.shape[-2:]:
                return  # text of different lengths: positions do not correspond
            if prefix is not None:
                prefix_sum = prefix.double().sum(0) + (0 if prefix_sum is None else prefix_sum)
            y = wanted.double().flatten(2).transpose(1, 2)  # (rows, P_out, C_out)
            if grid.shape[-2] * grid.shape[-1] >= y.shape[1]:  # the grid stays or shrinks: resample the chunk
                x = self.resample(grid.double()).flatten(2).transpose(1, 2)
                flat = torch.cat([x.reshape(-1, width), x.new_ones(x.shape[0] * x.shape[1], 1)], dim=1)
                gram += flat.T @ flat
                cross += flat.T @ y.reshape(-1, out_width)
                continue
            # The grid grows: X_n = R G_n for each row's (P_in, C_in) grid G_n, so X^T X = sum_n G_n^T (R^T R) G_n
            # and X^T Y = sum_n G_n^T (R^T Y_n); the bias column of X is all ones (R^T 1 and the sums of Y).
            x = grid.double().flatten(2).transpose(1, 2)  # (rows, P_in, C_in)
            if resampling is None:
                basis = torch.eye(x.shape[1], dtype=torch.float64, device=device).reshape(1, -1, *grid.shape[-2:])
                resampling = self.resample(basis).flatten(2)[0].T
            flat = x.reshape(-1, width)
            gram[:-1, :-1] += flat.T @ (resampling.T @ resampling @ x).reshape(-1, width)
            bias = (x * resampling.sum(0)[:, None]).sum((0, 1))
            gram[:-1, -1] += bias
            gram[-1, :-1] += bias
            gram[-1, -1] += len(x) * y.shape[1]
            cross[:-1] += flat.T @ (resampling.T @ y).reshape(-1, out_width)
            cross[-1] += y.sum((0, 1))
        gram += (
            ridge
            * gram.diagonal()[:-1].mean().clamp_min(1e-12)
            * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        )
        solution = torch.linalg.solve(gram, cross)
        self.proj.weight.copy_(solution[:-1].T[:, :, None, None].to(self.proj.weight))
        assert self.proj.bias is not None, "nn.Conv2d is built with a bias"
        self.proj.bias.copy_(solution[-1])
        if self.prefix is not None and prefix_sum is not None:
            self.prefix.copy_(prefix_sum / len(inputs))

    def least_squares_bytes(self) -> int:
        """Working memory :meth:`fit_least_squares` needs for one row: its input and target in float32 and in
        float64, and twice the larger of its two grids at both widths in float64."""
        size_in, size_out = math.prod(self.insertion.shape), math.prod(self.cut.shape)
        positions = max(_positions(self.insertion), _positions(self.cut))
        return 12 * (size_in + size_out) + 16 * positions * (self.insertion.channels + self.cut.channels)

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


def _positions(spec: FeatureSpec) -> int:
    """Grid positions of a feature (text: its tokens)."""
    return math.prod(spec.grid) if spec.grid is not None else spec.shape[0]
