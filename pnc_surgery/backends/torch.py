"""Fallback backend for plain ``nn.Module`` classifiers: traced generically, not rebuildable from a file."""

from __future__ import annotations

from torch import nn

from .base import Backend

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    """Any ``nn.Module`` that maps one tensor to ``(batch, classes)`` logits."""

    family = "torch"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return True
