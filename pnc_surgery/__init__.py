"""pnc_surgery: Partial Network Cloning for timm and transformers classifiers.

Copy the classes a *source* classifier knows into a *target* classifier as a small patch attached through
forward hooks; the target's own parameters are never written.
"""

from importlib.metadata import PackageNotFoundError, version

from .branch import Branch, capture_features
from .clone import CloneConfig, clone
from .errors import (
    CloneError,
    InvalidInputError,
    PatchFormatError,
    PatchMismatchError,
    PatchStateError,
    PncError,
    UnsupportedModelError,
)
from .models import load_model
from .patch import Patch
from .points import Point, check_cut, find_points

try:
    __version__ = version("pnc_surgery")  # the one version: pyproject.toml's, as installed
except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "clone",
    "CloneConfig",
    "Patch",
    "Point",
    "find_points",
    "check_cut",
    "load_model",
    "Branch",
    "capture_features",
    "PncError",
    "InvalidInputError",
    "UnsupportedModelError",
    "PatchMismatchError",
    "PatchFormatError",
    "PatchStateError",
    "CloneError",
]
