"""What the gate sees: :class:`GateInputs`, and how a patch computes them.

The gate decides from five tensors per input, all of which the patched forward computes anyway: the target's
logits and the input of its classifier (its pre-logits), the branch's logits and the input of the branch's
classifier (the source's own pre-logits for the cloned classes), and the target's feature at the insertion point
averaged over its positions. :func:`branch_outputs` runs the branch and keeps its classifier's input;
:func:`patch_gate_inputs` is what the attached patch hands its gate for a batch.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .branch import Branch
    from .patch import Patch

__all__ = ["GateInputs", "branch_outputs", "patch_gate_inputs", "pooled_feature"]

_CAPTURE_LOCK = threading.RLock()


class GateInputs(NamedTuple):
    """The gate's inputs for a batch (one row per input)."""

    target_logits: torch.Tensor
    branch_logits: torch.Tensor
    pre_logits: torch.Tensor
    """Input of the target's classifier layers (flattened, concatenated; width 0 where it has none)."""
    branch_features: torch.Tensor
    """Input of the branch's classifier layers (flattened, concatenated; width 0 where it has none)."""
    insertion_features: torch.Tensor
    """The target's feature at the insertion point, averaged over its positions (grid cells or unpadded tokens).
    Pooled earlier in the network than the pre-logits, it still shows what an input is made of (which words, which
    textures), where the classifier's input shows mostly which of the target's classes it resembles."""

    def select(self, index: torch.Tensor) -> GateInputs:
        """The rows ``index`` of every part."""
        return GateInputs(*(part[index] for part in self))

    @staticmethod
    def cat(parts: list[GateInputs]) -> GateInputs:
        """Rows of several batches, in order."""
        return GateInputs(*(torch.cat(column) for column in zip(*parts)))


def branch_outputs(branch: Branch, adapted: torch.Tensor, **context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The branch's logits for an adapted feature, and the input of its classifier layers.

    Returns:
        ``(logits, features)``; ``features`` has width 0 when the branch has no classifier layer.
    """
    captured: list[torch.Tensor] = []
    with _CAPTURE_LOCK:  # the capture hooks sit on shared modules: one thread's call must not feed another's list
        hooks = [
            branch.model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args: captured.append(args[0].detach().flatten(1))
            )
            for name in branch.classifiers
        ]
        try:
            logits = branch(adapted, **context)
        finally:
            for hook in hooks:
                hook.remove()
    features = torch.cat(captured, dim=1) if captured else logits.new_zeros(len(logits), 0)
    return logits, features


def patch_gate_inputs(
    patch: Patch, feature: torch.Tensor, target_logits: torch.Tensor, pre_logits: torch.Tensor, **context: torch.Tensor
) -> GateInputs:
    """What ``patch``'s gate sees for a batch, from the target's feature at the insertion point, its logits and
    pre-logits (as the attached patch computes them)."""
    branch_logits, branch_features = branch_outputs(patch.branch, patch.adapter(feature), **context)
    pooled = pooled_feature(patch.adapter.to_grid(feature)[0], context.get("attention_mask"))
    return GateInputs(target_logits, branch_logits, pre_logits, branch_features, pooled)


def pooled_feature(grid: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A (B, C, H, W) feature (text: (B, C, L, 1)) averaged over its positions; text averages its unmasked tokens."""
    grid = grid.float()
    if attention_mask is None or grid.shape[-1] != 1 or attention_mask.shape[-1] != grid.shape[-2]:
        return grid.mean(dim=(-2, -1))
    weight = attention_mask.to(grid.dtype)[:, None, :, None]
    return (grid * weight).sum(dim=(-2, -1)) / weight.sum(dim=(-2, -1)).clamp_min(1.0)
