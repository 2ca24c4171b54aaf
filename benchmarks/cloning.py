"""The PNC rows of the benchmark: ``pnc_surgery.clone`` and its ablations, as benchmark methods.

Each variant is ``pnc_surgery.CloneConfig`` with one switch turned off, so the table shows what each part of the
method buys: localization (pruning the cloned source tail), the joint search of cut and insertion points, and
the gate that keeps the target's answers on its own classes.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from torch import nn

from pnc_surgery.clone import CloneConfig, clone

from .metrics import patch_part_bytes
from .protocol import Context, Method, Outcome

__all__ = ["PNC_VARIANTS", "pnc_method", "pnc_methods"]

PNC_VARIANTS: dict[str, dict[str, Any]] = {
    "pnc": {},
    "pnc_no_localize": {"localize": False},
    "pnc_last_stage": {"search_positions": False},
    "pnc_no_gate": {"gate": "none"},
}
"""``CloneConfig`` overrides by row name: the full method, then one ablation a row."""


def pnc_method(overrides: dict[str, Any], base: dict[str, Any] | None = None) -> Method:
    """A benchmark method that clones with ``CloneConfig(**base, **overrides)`` and attaches the patch.

    Args:
        overrides: the variant's switches (see :data:`PNC_VARIANTS`).
        base: settings shared by every variant (budgets), from the run configuration.
    """

    def run(ctx: Context) -> Outcome:
        config = CloneConfig(**{**(base or {}), **overrides})
        start = time.perf_counter()
        patch = clone(
            ctx.source,
            ctx.target,
            ctx.split.clone,
            classes=list(ctx.split.clone_source_ids),
            replay=ctx.split.replay,
            config=config,
            seed=ctx.seed,
            progress=ctx.progress,
        )
        seconds = time.perf_counter() - start
        extra_params = int(patch.num_parameters)  # read before attaching (see the report's open problems)
        with tempfile.TemporaryDirectory() as folder:
            path = patch.save(os.path.join(folder, "patch.safetensors"))
            patch_bytes = os.path.getsize(path)
        patch.attach(ctx.target)

        def release() -> nn.Module:
            patch.detach()
            return ctx.target

        return Outcome(
            ctx.target,
            ctx.target,
            extra_params,
            patch_bytes,
            seconds,
            release,
            notes={
                "clone_config": {**(base or {}), **overrides},
                "patch_metrics": dict(patch.metrics),
                "patch_part_bytes": patch_part_bytes(patch),
            },
        )

    return run


def pnc_methods(base: dict[str, Any] | None = None) -> dict[str, Method]:
    """PNC and its ablations by row name, sharing the ``CloneConfig`` settings ``base``."""
    return {name: pnc_method(overrides, base) for name, overrides in PNC_VARIANTS.items()}
