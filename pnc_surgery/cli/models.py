"""Load the models the CLI is pointed at: timm names or local transformers folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InvalidInputError
from ..files import read_tensors

__all__ = ["load_model"]


def load_model(
    spec: str, *, pretrained: bool = False, kwargs: str | None = None, checkpoint: str | None = None
) -> nn.Module:
    """A model from a timm name (``resnet18``) or a local transformers folder (``config.json`` [+ weights]).

    Args:
        spec: the timm model name or the folder.
        pretrained: download pretrained timm weights (needs network).
        kwargs: JSON object of timm ``create_model`` kwargs (``'{"num_classes": 5, "in_chans": 1}'``).
        checkpoint: a safetensors state dict to load into the model.
    """
    extra: dict[str, Any] = json.loads(kwargs) if kwargs else {}
    if not isinstance(extra, dict):
        raise InvalidInputError(f"--kwargs must be a JSON object, got {kwargs!r}")
    folder = Path(spec)
    if folder.is_dir() and (folder / "config.json").is_file():
        model = _transformers_model(folder)
    else:
        import timm

        from ..backends.timm import create_model

        if spec not in timm.list_models():
            raise InvalidInputError(
                f"{spec!r} is neither a timm model name nor a folder with a transformers config.json"
            )
        model = create_model(spec, pretrained=pretrained, **extra)
    if checkpoint:
        tensors, _ = read_tensors(checkpoint)
        model.load_state_dict(tensors)
    return model.eval()


def _transformers_model(folder: Path) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise InvalidInputError(f"{folder}/config.json names no transformers model class in 'architectures'")
    has_weights = any(folder.glob("*.safetensors"))
    return cls.from_pretrained(folder) if has_weights else cls(config)
