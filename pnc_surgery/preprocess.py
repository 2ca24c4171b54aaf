"""Raw clone data (PIL images, image paths, an image folder, ``datasets`` rows, strings) as each model's own tensors.

Each model is fed in its own format: timm models through their data config's eval transform, transformers models
through their image processor or tokenizer (passed, or loaded from the model's ``name_or_path``). The result is an
:class:`~pnc_surgery.data.Examples` whose inputs are the target's and whose ``source`` inputs are the source's.
Data already made of tensors is left to :func:`pnc_surgery.data.collect`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import backend_for
from .backends.base import ModelInputs
from .backends.timm import TimmBackend
from .data import Examples, class_id
from .errors import InvalidInputError

__all__ = ["Columns", "is_raw", "encode"]

_MODES = {1: "L", 3: "RGB"}
"""The PIL mode images are read in for a model of that many channels."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

Columns = tuple[str, str, str]
"""Names of the ``(image, label, text)`` columns of ``datasets`` rows."""


def is_raw(data: Any) -> bool:
    """Whether ``data`` holds raw examples (an image folder, dict rows, or pairs of PIL image / path / string)."""
    if isinstance(data, (str, os.PathLike)):
        return True
    if not isinstance(data, Sequence) and not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return False
    if len(data) == 0:
        return False
    first = data[0]
    if isinstance(first, Mapping):
        return not all(isinstance(v, torch.Tensor) for v in first.values())
    return isinstance(first, (tuple, list)) and len(first) >= 1 and _is_raw_item(first[0])


def _is_raw_item(item: Any) -> bool:
    from PIL import Image

    return isinstance(item, (str, os.PathLike, Image.Image))


def _folder(path: Path, names: Sequence[str] | None) -> list[tuple[Any, Any]]:
    """``(image path, label)`` of an image folder with one sub-folder per class (a class id or label name)."""
    if not path.is_dir():
        raise InvalidInputError(f"{str(path)[:200]!r} is not a folder of class sub-folders")
    pairs = [
        (file, _folder_label(folder.name, names))
        for folder in sorted(p for p in path.iterdir() if p.is_dir())
        for file in sorted(folder.iterdir())
        if file.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not pairs:
        raise InvalidInputError(f"{str(path)[:200]!r} has no images in class sub-folders")
    return pairs


def _folder_label(name: str, names: Sequence[str] | None) -> int | str:
    return int(name) if name.isdigit() and not (names and name in names) else name


def _rows(data: Any, columns: Columns, labelled: bool) -> list[tuple[Any, Any]]:
    """``(image or text, label)`` of ``datasets``-like rows (dicts)."""
    image_column, label_column, text_column = columns
    first = data[0]
    column = image_column if image_column in first else text_column if text_column in first else None
    if column is None or (labelled and label_column not in first):
        raise InvalidInputError(
            f"data rows have columns {sorted(first)[:20]}; expected {image_column!r} or {text_column!r}"
            + (f" and {label_column!r}" if labelled else "")
            + " (set image_column= / text_column= / label_column=)"
        )
    return [(row[column], row.get(label_column)) for row in (data[i] for i in range(len(data)))]


def _open(item: Any) -> Any:
    """A PIL image from a PIL image, a path, or a ``datasets`` image dict (``bytes`` / ``path``)."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, Mapping):
        item = io.BytesIO(item["bytes"]) if item.get("bytes") else item.get("path")
    try:
        with Image.open(item) as image:
            image.load()
            return image
    except (OSError, TypeError, ValueError, AttributeError) as exc:  # kept as the cause: a file that cannot be used
        raise InvalidInputError(f"cannot read image {str(item)[:200]!r}: {exc}") from exc


def _local_only() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _encoder(model: nn.Module, role: str, processor: Any, text: bool) -> Callable[[list[Any]], ModelInputs]:
    """How a list of images (PIL) or strings becomes ``model``'s input tensors."""
    if processor is None and isinstance(backend_for(model), TimmBackend):
        if text:
            raise InvalidInputError(f"the {role} is a timm image model; it cannot take strings")
        return _timm_encoder(model, role)
    if processor is None:
        processor = _hub_processor(model, role, text)
    if not callable(processor):
        raise InvalidInputError(f"{role}_processor must be callable, got {type(processor).__name__}")
    mode = None if text else _MODES[_channels(model, role)]

    def encode(items: list[Any]) -> ModelInputs:
        try:
            if text:
                encoded = processor(items, padding=True, truncation=True, return_tensors="pt")
                return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
            return processor(images=[image.convert(mode) for image in items], return_tensors="pt")["pixel_values"]
        except Exception as exc:  # the user's or the hub's processor: any failure is reported as what it is
            raise InvalidInputError(
                f"the {role}'s processor failed on the clone data: {type(exc).__name__}: {exc}"
            ) from None

    return encode


def _channels(model: nn.Module, role: str) -> int:
    """How many channels ``model`` takes (1: grey, 3: RGB), by its own config (timm's data config assumes 3 whatever
    ``in_chans``); 3 when it cannot tell."""
    expected = backend_for(model).expected_image(model)
    channels = 3 if expected is None else expected[0]
    if channels not in _MODES:
        raise InvalidInputError(f"the {role} takes {channels}-channel inputs; images give 1 (grey) or 3 (RGB)")
    return channels


def _timm_encoder(model: nn.Module, role: str) -> Callable[[list[Any]], ModelInputs]:
    from timm.data import create_transform, resolve_model_data_config

    config, channels = resolve_model_data_config(model), _channels(model, role)
    if len(config["mean"]) != channels:  # a model built with in_chans=1: grey images, the channels' mean statistics
        config["mean"], config["std"] = ((sum(config[k]) / len(config[k]),) * channels for k in ("mean", "std"))
    transform = create_transform(**config, is_training=False)
    return lambda images: torch.stack([transform(image.convert(_MODES[channels])) for image in images])


def _hub_processor(model: nn.Module, role: str, text: bool) -> Any:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "name_or_path", None)
    kind = "tokenizer" if text else "image processor"
    if not name:
        raise InvalidInputError(
            f"the {role} ({type(model).__name__}) has no name_or_path to load its {kind} from: "
            f"pass {role}_processor= (an AutoTokenizer or AutoImageProcessor; pnc-surgery clone: --{role}-processor)"
        )
    from transformers import AutoImageProcessor, AutoTokenizer

    loader = AutoTokenizer if text else AutoImageProcessor
    try:
        return loader.from_pretrained(name, local_files_only=_local_only())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot load the {role}'s {kind} from {name!r} ({exc}): pass {role}_processor= "
            f"(pnc-surgery clone: --{role}-processor)"
        ) from None


def encode(
    data: Any,
    target: nn.Module,
    source: nn.Module | None = None,
    *,
    target_processor: Any = None,
    source_processor: Any = None,
    columns: Columns = ("image", "label", "text"),
    names: Sequence[str] | None = None,
    what: str = "data",
    labelled: bool = True,
) -> Examples:
    """Raw ``data`` (see :func:`is_raw`) as the target's tensors, with the source's own tensors beside them.

    Args:
        data: an image folder, ``datasets``-like rows (dicts), or ``(image | path | string, label)`` pairs.
        target: the model whose inputs become ``Examples.inputs``.
        source: the model whose inputs become ``Examples.source`` (``None``: none, as for replay data).
        target_processor: image processor or tokenizer of the target (default: its timm data config, or
            loaded from its ``name_or_path``); likewise ``source_processor``.
        columns: the ``(image, label, text)`` column names of dict rows.
        names: the source's label names, so labels and folder names may be names.
        what: what the data is called in error messages.
        labelled: whether labels are required.

    Returns:
        The encoded examples (labels as source class ids).

    Raises:
        InvalidInputError: unreadable images or rows, unknown labels, or a model whose processor cannot be found.
    """
    if isinstance(data, (str, os.PathLike)):
        pairs = _folder(Path(data), names)
    elif isinstance(data[0], Mapping):
        pairs = _rows(data, columns, labelled)
    else:
        pairs = [(item[0], item[1] if len(item) > 1 else None) for item in data]
    text = isinstance(pairs[0][0], str) and not os.path.isfile(pairs[0][0])
    items = [item if text else _open(item) for item, _ in pairs]
    if text and not all(isinstance(item, str) for item in items):
        raise InvalidInputError(f"{what} mixes strings with other inputs")
    labels = None
    if labelled:
        if any(label is None for _, label in pairs):
            raise InvalidInputError(f"{what} has examples without a label")
        labels = torch.tensor([class_id(label, names) for _, label in pairs])
    inputs = _encoder(target, "target", target_processor, text)(items)
    source_inputs = _encoder(source, "source", source_processor, text)(items) if source is not None else None
    return Examples(inputs, labels, source_inputs)
