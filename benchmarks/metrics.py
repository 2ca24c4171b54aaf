"""The numbers of a benchmark row: accuracy, locality, what changed in the target, size and speed.

Definitions (BENCHMARK.md), over the combined label space A then K:
    * ``acc_old`` / ``acc_new`` / ``acc_all``: top-1 accuracy on the test images of A / of K / of both.
    * ``locality``: share of A's test images whose prediction equals the original target's prediction.
    * ``target_params_changed``: parameter elements of the deployed model that differ from the original target's
      (for a grown head, its old rows); ``target_buffers_changed`` likewise for buffers (BatchNorm statistics).
    * ``detach_max_abs_diff``: after the method's own undo, max |logits - original logits| on the test set.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from .training import logits_of

__all__ = [
    "snapshot",
    "accuracy_metrics",
    "count_changed",
    "max_abs_diff",
    "safetensors_bytes",
    "patch_bytes",
    "patch_part_bytes",
    "median_latencies",
]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, by name (what :func:`count_changed` compares against)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=False).items()}


def accuracy_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_old: int, original_predictions: torch.Tensor
) -> dict[str, float]:
    """``acc_old``, ``acc_new``, ``acc_all`` and ``locality`` from a method's test logits.

    Args:
        logits: ``[n, len(A) + len(K)]`` test logits of the method's model.
        labels: test labels in the combined space (``< num_old`` for A).
        num_old: ``len(A)``.
        original_predictions: the original target's argmax on the same test images (A's space).
    """
    predictions = logits.argmax(dim=1)
    correct = (predictions == labels).float()
    old = labels < num_old
    return {
        "acc_old": correct[old].mean().item(),
        "acc_new": correct[~old].mean().item(),
        "acc_all": correct.mean().item(),
        "locality": (predictions[old] == original_predictions[old]).float().mean().item(),
    }


def _differing(original: torch.Tensor, current: torch.Tensor) -> int:
    """Elements of ``original`` that differ in ``current`` (whose dims may be larger: a grown head)."""
    if current.shape != original.shape:
        assert current.dim() == original.dim() and all(c >= o for c, o in zip(current.shape, original.shape)), (
            f"cannot compare shapes {tuple(original.shape)} and {tuple(current.shape)}"
        )
        current = current[tuple(slice(0, size) for size in original.shape)]
    return int((current != original).sum().item())


def count_changed(original: dict[str, torch.Tensor], model: nn.Module) -> tuple[int, int]:
    """``(parameter elements changed, buffer elements changed)`` of ``model`` against an original :func:`snapshot`.

    Tensors are matched by name; every original parameter must still be there (a method that renames the
    target's tensors must hand back a merged model).
    """
    state = model.state_dict()
    missing = [name for name in original if name not in state]
    assert not missing, f"the deployed model lacks the target's tensors {missing[:5]}"
    param_names = {name for name, _ in model.named_parameters()}
    params = buffers = 0
    for name, tensor in original.items():
        changed = _differing(tensor, state[name])
        if name in param_names:
            params += changed
        else:
            buffers += changed
    return params, buffers


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` (``inf`` if the shapes differ, since then the model is not the original)."""
    if a.shape != b.shape:
        return float("inf")
    return (a - b).abs().max().item() if a.numel() else 0.0


def safetensors_bytes(model: nn.Module) -> int:
    """Size of ``model``'s weights saved as one safetensors file."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_model(model, path)
        return os.path.getsize(path)


def patch_bytes(patch: Any) -> int:
    """Size of ``patch`` saved as its safetensors file (tensors, header and config)."""
    with tempfile.TemporaryDirectory() as folder:
        return os.path.getsize(patch.save(os.path.join(folder, "patch.safetensors")))


def patch_part_bytes(patch: nn.Module) -> dict[str, int]:
    """Bytes of the patch's tensors by part (``branch``, ``adapter``, ``gate``, ...)."""
    parts: dict[str, int] = {}
    for name, tensor in [*patch.named_parameters(), *patch.named_buffers()]:
        part = name.split(".", 1)[0]
        parts[part] = parts.get(part, 0) + tensor.numel() * tensor.element_size()
    return parts


@torch.no_grad()
def median_latencies(
    models: Sequence[Callable[[torch.Tensor], object]], batch: torch.Tensor, repeats: int = 9
) -> list[float]:
    """Median wall seconds of one eval forward of ``batch`` through each model.

    The models are timed in interleaved rounds (after one warm-up call each), so a change in machine load
    during the measurement affects all of them alike and their ratios stay meaningful.
    """
    for model in models:
        if isinstance(model, nn.Module):
            model.eval()
        logits_of(model(batch))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for model, record in zip(models, times):
            start = time.perf_counter()
            logits_of(model(batch))
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]
