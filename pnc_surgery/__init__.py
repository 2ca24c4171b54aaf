"""pnc_surgery: Partial Network Cloning for timm and transformers classifiers.

Copy the classes a *source* classifier knows into a *target* classifier as a small patch attached through
forward hooks; the target's own parameters are never written.
"""
from .errors import (
    CloneError,
    InvalidInputError,
    PatchFormatError,
    PatchMismatchError,
    PatchStateError,
    PncError,
    UnsupportedModelError,
)
from .branch import SourceTail, capture_features
from .clone import CloneConfig, clone
from .patch import Patch
from .points import Point, find_points

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "clone",
    "CloneConfig",
    "Patch",
    "Point",
    "find_points",
    "SourceTail",
    "capture_features",
    "PncError",
    "InvalidInputError",
    "UnsupportedModelError",
    "PatchMismatchError",
    "PatchFormatError",
    "PatchStateError",
    "CloneError",
]
