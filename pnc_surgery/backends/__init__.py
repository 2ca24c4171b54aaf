"""Model-family knowledge behind one small interface.

Everything pnc_surgery needs to know about a *family* of models (how to call it, where its logits are, how to
make an example input, how to record its architecture and rebuild it without weights) lives in a backend.
The rest of the library is family-agnostic: it traces modules with hooks and talks to models through
:class:`Backend`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import InvalidInputError, UnsupportedModelError
from .base import Backend, ModelInputs
from .hf import TransformersBackend
from .timm import TimmBackend
from .torch import TorchBackend

__all__ = [
    "Backend",
    "ModelInputs",
    "backend_for",
    "backend_named",
    "TimmBackend",
    "TransformersBackend",
    "TorchBackend",
]

_BACKENDS: tuple[type[Backend], ...] = (TransformersBackend, TimmBackend, TorchBackend)


def backend_for(model: Any) -> Backend:
    """The backend that knows ``model``'s family.

    Raises:
        InvalidInputError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"expected a torch.nn.Module classifier, got {type(model).__name__}")
    for backend_cls in _BACKENDS:
        if backend_cls.handles(model):
            return backend_cls()
    raise UnsupportedModelError(
        f"no backend handles {type(model).__name__}"
    )  # pragma: no cover - TorchBackend takes all


def backend_named(family: str) -> Backend:
    """The backend recorded under ``family`` in a patch config."""
    for backend_cls in _BACKENDS:
        if backend_cls.family == family:
            return backend_cls()
    raise UnsupportedModelError(f"unknown model family {family!r}; known: {[b.family for b in _BACKENDS]}")
