"""Patch files: safe reading and all-or-nothing writing, and rebuilding a patch from them without its source model.

A saved patch is a folder with ``patch_config.json`` (JSON, no code), ``patch_model.safetensors`` (tensors, no
pickle) and a ``README.md`` model card; the single-file form keeps the same JSON in the safetensors metadata
under :data:`METADATA_KEY`. Every byte read from disk goes through this module:

* a config is read only if small (:data:`MAX_CONFIG_BYTES`) and enters the library only through
  :meth:`PatchConfig.from_dict`; a safetensors header is read only if it fits the file and
  :data:`MAX_HEADER_BYTES`; pickle files are refused by name and by content; non-finite tensors are refused;
* rebuilding allocates nothing the file's sizes ask for: modules are built on the meta device and receive the
  stored tensors, and only then does a one-example self-test run (its input is capped by the config validator);
* a folder save writes all files under temporary names first and then renames them (weights, then config,
  then card); the config records a digest of the tensors, so a folder left half-written by a crash is refused
  rather than loaded with another save's class ids. Files are never written through links, and all three get
  the same permissions (those of a new file under the process umask).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _safetensors_bytes
from torch import nn

from .. import adapters as _adapters
from ..branch import Branch
from ..errors import InvalidInputError, PatchFormatError, PatchStateError, PncError
from ..gate import Gate
from .config import PatchConfig

if TYPE_CHECKING:
    from .module import Patch

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "METADATA_KEY",
    "PATCH_FILES",
    "PICKLE_SUFFIXES",
    "WEIGHTS_NAME",
    "check_finite",
    "check_folder_path",
    "decode_json",
    "open_safetensors",
    "read_config",
    "read_tensors",
    "rebuild",
    "tensor_bytes",
    "tensors_digest",
    "write_folder",
    "write_single_file",
]

CONFIG_NAME = "patch_config.json"
WEIGHTS_NAME = "patch_model.safetensors"
CARD_NAME = "README.md"
PATCH_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
METADATA_KEY = "pnc_surgery_config"
MAX_CONFIG_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 64 * 2**20
MAX_TENSORS = 100_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# --------------------------------------------------------------------------------------------- reading


def decode_json(text: str | bytes, where: str) -> Any:
    """Parse untrusted JSON; any failure is a :class:`PatchFormatError` naming ``where``."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PatchFormatError(f"{where}: not valid JSON ({exc})") from None


def read_config(path: str | Path) -> PatchConfig:
    """Read ``patch_config.json`` (only if small enough) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise PatchFormatError(f"{path}: no patch config here (expected a file named {CONFIG_NAME})")
    if (size := path.stat().st_size) > MAX_CONFIG_BYTES:
        raise PatchFormatError(f"{path}: config is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    return PatchConfig.from_dict(decode_json(path.read_bytes(), str(path)), str(path))


@contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safe_open`` on ``path`` (CPU, PyTorch) once it can only be a safetensors file: not pickle-based by name, and
    a header no larger than :data:`MAX_HEADER_BYTES` (checked before ``safe_open`` reads it, which then checks that it
    fits the file and parses). Any failure, opening or reading, is a :class:`PatchFormatError`."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PatchFormatError(f"{path}: refusing to load a pickle-based file; patches are safetensors only")
    if not path.is_file():
        raise PatchFormatError(f"{path}: file not found")
    with open(path, "rb") as handle:
        claimed = int.from_bytes(handle.read(8), "little")  # the header's length (pickle bytes read as a huge one)
    if claimed > MAX_HEADER_BYTES:
        raise PatchFormatError(
            f"{path}: not a valid safetensors file (header claims {claimed} bytes, more than {MAX_HEADER_BYTES}); "
            "pickle files (.bin/.pt) are refused"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            yield reader
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as exc:
        raise PatchFormatError(f"{path}: not a valid safetensors file ({exc})") from None


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file that :func:`open_safetensors` accepts, with at most :data:`MAX_TENSORS` tensors, none
    of them non-finite (``safe_open`` itself refuses metadata that does not map strings to strings).

    Returns:
        ``(tensors, metadata)``: CPU tensors by name and the string metadata of the header.
    """
    with open_safetensors(path) as reader:
        if len(names := list(reader.keys())) > MAX_TENSORS:
            raise PatchFormatError(f"{path}: {len(names)} tensors, more than the {MAX_TENSORS} allowed")
        tensors, metadata = {name: reader.get_tensor(name) for name in names}, reader.metadata() or {}
    check_finite(tensors, f"{path}: refusing a patch with")
    return tensors, metadata


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`PatchFormatError` (``what`` + the tensor names) if a floating tensor holds NaN or infinity."""
    bad = [
        name
        for name, t in tensors.items()
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise PatchFormatError(f"{what} non-finite values (NaN or infinity) in {len(bad)} tensors: {bad[:5]}")


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (binds a config to its tensors)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- writing


def check_folder_path(folder: str | Path) -> Path:
    """The folder a save may write to: not a file, no link loop, creatable. Nothing is written.

    Raises:
        InvalidInputError: ``folder`` is a file or a link that cannot be followed.
    """
    folder = Path(folder)
    try:
        folder.resolve(strict=False)
        is_dir = folder.is_dir()
    except (OSError, RuntimeError) as exc:  # a link loop: RuntimeError before Python 3.13, OSError after
        raise InvalidInputError(f"{folder}: cannot be used as a folder ({exc})") from None
    if folder.exists() and not is_dir:
        raise InvalidInputError(f"{folder} is a file; save_pretrained writes a folder (Patch.save writes one file)")
    if folder.is_symlink() and not folder.exists():
        raise InvalidInputError(f"{folder} is a link to nothing; remove it or pass another folder")
    return folder


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist) with ``data``, permissions 0o666 minus the umask, never via a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_folder(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write ``{name: bytes}`` into ``folder`` all-or-nothing: temporary files first, then one rename each.

    The renames go in the order given (weights before config), replacing links rather than writing through them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    temporary = {name: folder / f".{name}.{token}.tmp" for name in files}
    try:
        for name, data in files.items():
            _write_new(temporary[name], data)
        for name, path in temporary.items():
            os.replace(path, folder / name)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


def write_single_file(path: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """The single-file form: tensors in safetensors, the config in its metadata; replaces ``path`` in one step."""
    path = Path(path)
    try:
        if path.is_dir():
            raise InvalidInputError(f"{path} is a folder; Patch.save writes one file (save_pretrained writes a folder)")
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot be used as a file ({exc})") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidInputError(f"{path}: a patch is safetensors; use a .safetensors name")
    data = tensor_bytes(tensors, {"format": "pt", METADATA_KEY: json.dumps(dict(config), sort_keys=True)})
    parent = path.parent
    if not parent.is_dir():
        raise InvalidInputError(f"{parent}: no such folder")
    temporary = parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        _write_new(temporary, data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Tensors (moved to the CPU, made contiguous) as safetensors bytes, refusing non-finite values."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    try:
        check_finite(cpu, "cannot save a patch with")
    except PatchFormatError as exc:
        raise PatchStateError(f"{exc}; it was not saved") from None
    return _safetensors_bytes(cpu, metadata=dict(metadata))


# --------------------------------------------------------------------------------------------- rebuilding


def rebuild(patch_class: type[Patch], config: PatchConfig, tensors: dict[str, torch.Tensor], where: str) -> Patch:
    """A patch from a checked config and its tensors: modules built on the meta device, then given the tensors.

    Raises:
        PatchFormatError: anything about the files that does not fit (every failure, named with ``where``).
    """
    try:
        return _rebuild(patch_class, config, tensors)
    except PncError as exc:
        raise PatchFormatError(f"{where}: {exc}") from None
    except Exception as exc:
        raise PatchFormatError(f"{where}: the patch does not load ({type(exc).__name__}: {exc})") from None


def _rebuild(patch_class: type[Patch], config: PatchConfig, tensors: dict[str, torch.Tensor]) -> Patch:
    branch = Branch.from_spec(config.branch.to_dict(), dict(config.source.architecture))
    with torch.device("meta"):  # sizes come from the untrusted config: allocate only what the file holds
        adapter = _adapters.Adapter.from_spec(config.adapter)
        spec = config.gate
        gate = Gate.from_spec(spec.to_dict())
    patch = patch_class(branch, adapter, gate, config)
    _assign(patch, tensors)
    if config.tensors_sha256 is not None and tensors_digest(tensors) != config.tensors_sha256:
        raise PatchFormatError(
            f"the tensors are not the ones {CONFIG_NAME} was saved with (a save was interrupted, or the files come "
            "from two saves); save the patch again"
        )
    _self_test(patch)
    return patch


def _assign(patch: Patch, tensors: dict[str, torch.Tensor]) -> None:
    """Put loaded tensors into the rebuilt modules (a pruned branch's parameters are replaced, not copied into)."""
    expected: dict[str, torch.Tensor] = dict(patch.named_parameters(remove_duplicate=False))
    expected.update(patch.named_buffers(remove_duplicate=False))
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise PatchFormatError(
            f"tensors do not match the recorded architecture (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, tensor in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = patch.get_submodule(owner_name)
        old = expected[name]
        if not name.startswith("branch.") and tuple(old.shape) != tuple(tensor.shape):  # only the branch is pruned
            raise PatchFormatError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(old.shape)}")
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            owner._buffers[attr] = tensor
    left = [name for name, t in [*patch.named_parameters(), *patch.named_buffers()] if t.device.type == "meta"]
    if left:
        raise PatchFormatError(f"tensors {left[:5]} are not in the file")


def _self_test(patch: Patch) -> None:
    """One forward on zeros, so a patch whose tensors do not fit fails at load time, not mid-forward."""
    config = patch.config
    shape = tuple(config.target.feature_shape)  # capped by the config validator
    dtype = patch.adapter.proj.weight.dtype
    feature = torch.zeros(1, *shape, dtype=dtype)
    context = {}
    if "attention_mask" in patch.branch.context_keys:
        mask = torch.ones(1, shape[0], dtype=torch.long)
        mask[0, 1:] = 0  # padding, so the mask is used (an all-ones mask is dropped) and its length checked
        context["attention_mask"] = mask
    with torch.no_grad():
        pre_logits = torch.zeros(1, config.target.pre_logits_width, dtype=dtype)
        out = patch(feature, torch.zeros(1, config.target.num_classes, dtype=dtype), pre_logits, **context)
    if tuple(out.shape) != (1, len(config.class_ids)):
        raise PatchFormatError(f"patch produces {tuple(out.shape[1:])} scores for {len(config.class_ids)} classes")
