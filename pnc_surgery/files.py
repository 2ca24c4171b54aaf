"""The patch file format: names, version, and safe readers/writers.

A saved patch is a folder with ``patch_config.json`` (JSON, no code) and ``patch_model.safetensors``
(tensors, no pickle), plus a ``README.md`` model card. The single-file form keeps the same JSON in the
safetensors metadata under :data:`METADATA_KEY`. Everything that reads bytes from disk goes through this
module, so the checks that keep loading as safe as safetensors itself live in one place.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_tensor_bytes
from safetensors.torch import save_file

from .errors import PatchFormatError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CARD_NAME",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "REQUIRED_CONFIG_KEYS",
    "check_config",
    "read_config",
    "write_config",
    "read_tensors",
    "write_tensors",
    "decode_embedded_config",
]

CONFIG_NAME = "patch_config.json"
WEIGHTS_NAME = "patch_model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
METADATA_KEY = "pnc_surgery_config"
REQUIRED_CONFIG_KEYS = ("format_version", "source", "cut", "target", "insertion", "classes", "adapter", "gate")

MAX_CONFIG_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 64 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_config(config: Any, where: str = "patch config") -> dict:
    """Validate the parts of a patch config every reader relies on.

    Args:
        config: the decoded JSON.
        where: what to call the config in error messages (usually its path).

    Returns:
        The same dict, known to be a dict with every required key and a supported format version.
    """
    if not isinstance(config, dict):
        raise PatchFormatError(f"{where}: expected a JSON object, got {type(config).__name__}")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise PatchFormatError(f"{where}: missing keys {missing}; is this a pnc_surgery patch?")
    version = config["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PatchFormatError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise PatchFormatError(
            f"{where}: format_version {version} is newer than this pnc_surgery understands ({FORMAT_VERSION}); "
            "upgrade pnc_surgery to load it"
        )
    return config


def _decode_json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PatchFormatError(f"{where}: not valid JSON ({exc})") from None


def read_config(path: str | Path) -> dict:
    """Read and validate ``patch_config.json``."""
    path = Path(path)
    if not path.is_file():
        raise PatchFormatError(f"{path}: no patch config here (expected a file named {CONFIG_NAME})")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise PatchFormatError(f"{path}: config is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    return check_config(_decode_json(path.read_bytes(), str(path)), str(path))


def write_config(path: str | Path, config: Mapping[str, Any]) -> None:
    """Write a config as indented, key-sorted JSON (stable diffs on the Hub)."""
    Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file after checking that it is one.

    Refuses pickle-based formats by name and by content, headers that claim more bytes than the file has or
    than :data:`MAX_HEADER_BYTES`, and anything safetensors itself rejects.

    Returns:
        ``(tensors, metadata)``: CPU tensors by name and the string metadata of the header.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PatchFormatError(f"{path}: refusing to load a pickle-based file; patches are safetensors only")
    if not path.is_file():
        raise PatchFormatError(f"{path}: file not found")
    data = path.read_bytes()
    if len(data) < 8:
        raise PatchFormatError(f"{path}: truncated safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise PatchFormatError(
            f"{path}: not a valid safetensors file (header claims {header_len} bytes, file has {len(data)}); "
            "pickle files (.bin/.pt) are refused"
        )
    header = _decode_json(data[8 : 8 + header_len], f"{path} header")
    if not isinstance(header, dict):
        raise PatchFormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PatchFormatError(f"{path}: safetensors metadata must map strings to strings")
    try:
        tensors = _load_tensor_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as exc:
        raise PatchFormatError(f"{path}: corrupt safetensors file ({exc})") from None
    return tensors, dict(metadata)


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (made contiguous, moved to CPU) as safetensors."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(cpu, str(path), metadata=dict(metadata or {}))


def decode_embedded_config(metadata: Mapping[str, str], where: str) -> dict:
    """Read the config the single-file form keeps in the safetensors metadata."""
    if METADATA_KEY not in metadata:
        raise PatchFormatError(f"{where}: no '{METADATA_KEY}' in the safetensors metadata; not a single-file patch")
    return check_config(_decode_json(metadata[METADATA_KEY], where), where)
