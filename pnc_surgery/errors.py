"""The exceptions pnc_surgery raises.

Every error the library raises on purpose derives from :class:`PncError`, so callers can catch the library's
complaints apart from bugs. Errors about the caller's arguments also derive from :class:`ValueError`.
"""

from __future__ import annotations

__all__ = [
    "HubTimeoutError",
    "InvalidInputError",
    "PatchFormatError",
    "PatchMismatchError",
    "PatchStateError",
    "CloneError",
    "PncError",
    "UnsupportedModelError",
]


class PncError(Exception):
    """Base class of every error raised on purpose by pnc_surgery."""


class InvalidInputError(PncError, ValueError):
    """An argument has the wrong type, shape, or content (raised before any work starts)."""


class UnsupportedModelError(PncError):
    """The model cannot be traced, cut, or rebuilt; the message says why."""


class PatchMismatchError(PncError):
    """A patch does not fit the model it is attached to (architecture, module, or shape)."""


class PatchFormatError(PncError):
    """A patch file or folder is missing, corrupt, unsafe, or of an unknown format version."""


class PatchStateError(PncError):
    """A patch is used in a state that does not allow it (attached twice, detached model, ...)."""


class HubTimeoutError(PncError, TimeoutError):
    """The Hugging Face Hub did not answer in time; the message says what was being waited for."""


class CloneError(PncError):
    """``clone()`` could not make a usable patch from valid inputs (its training diverged); the message says why."""
