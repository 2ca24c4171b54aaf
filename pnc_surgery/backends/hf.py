"""Hugging Face transformers classifiers (``*ForImageClassification``, ``*ForSequenceClassification``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..errors import InvalidInputError, UnsupportedModelError
from .base import Backend, ModelInputs, ordinary_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

__all__ = ["TransformersBackend", "SUPPORTED_CLASS_SUFFIXES"]

SUPPORTED_CLASS_SUFFIXES = ("ForImageClassification", "ForSequenceClassification", "ForImageClassificationWithTeacher")

TEXT_EXAMPLE_LENGTH = 16


class TransformersBackend(Backend):
    """``transformers.PreTrainedModel`` classifiers; logits live in ``ModelOutput.logits``."""

    family = "transformers"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether ``model`` is a transformers model. A model of a module never imported cannot be one, so a timm
        model is told apart without importing transformers (seconds of a first clone's time)."""
        if "transformers" not in sys.modules:
            return False
        from transformers import PreTrainedModel

        return isinstance(model, PreTrainedModel)

    def main_input_name(self, model: nn.Module) -> str:
        return str(getattr(model, "main_input_name", "input_ids"))

    def vocab_size(self, model: nn.Module) -> int | None:
        return getattr(model.config, "vocab_size", None)

    def pad_token_id(self, model: nn.Module) -> int | None:
        pad = getattr(model.config, "pad_token_id", None)
        return pad if isinstance(pad, int) else None

    def eos_token_id(self, model: nn.Module) -> int | None:
        eos = getattr(model.config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) and eos else eos
        return eos if isinstance(eos, int) and eos >= 0 else None

    def special_token_ids(self, model: nn.Module) -> set[int]:
        ids: set[int] = set()
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
            value = getattr(model.config, key, None)
            ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int) and v >= 0)
        return ids

    def example_input(self, model: nn.Module, batch_size: int = 2, seed: int = 0) -> ModelInputs:
        config, gen = model.config, torch.Generator().manual_seed(seed)
        main = self.main_input_name(model)
        if main == "pixel_values":
            size = getattr(config, "image_size", 224)
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            channels = int(getattr(config, "num_channels", 3))
            return {main: torch.randn(batch_size, channels, int(height), int(width), generator=gen)}
        if main == "input_ids":
            length = min(TEXT_EXAMPLE_LENGTH, int(getattr(config, "max_position_embeddings", TEXT_EXAMPLE_LENGTH)))
            mask = torch.ones(batch_size, length, dtype=torch.long)
            mask[1:, length - length // 4 :] = 0  # a padded row, so the mask matters
            vocab = max(int(getattr(config, "vocab_size", None) or 256), 2)  # character models take code points
            special = [i for i in self.special_token_ids(model) if i < vocab]
            ids = (
                ordinary_tokens(vocab, special, (batch_size, length), gen) if vocab > len(special) + 1 else mask.clone()
            )
            eos, pad = self.eos_token_id(model), self.pad_token_id(model)
            if eos is not None and eos < vocab:  # as a tokenizer ends each text (BART-style heads pool the last eos)
                ids[torch.arange(batch_size), mask.sum(1) - 1] = eos
            if pad is not None:  # and pads the masked positions
                ids[mask == 0] = pad
            return {main: ids, "attention_mask": mask}
        raise UnsupportedModelError(f"cannot build an example {main!r} for {type(model).__name__}; pass example_input")

    def call_inputs(self, model: nn.Module, inputs: ModelInputs) -> ModelInputs:
        """transformers models take keywords: a bare data tensor becomes ``{main_input_name: tensor}``."""
        if isinstance(inputs, torch.Tensor):
            return {self.main_input_name(model): inputs}
        return inputs

    def check_input(self, model: nn.Module, inputs: ModelInputs) -> None:
        main = self.main_input_name(model)
        if not isinstance(inputs, Mapping):
            raise InvalidInputError(
                f"transformers models take a tensor (their {main!r}) or keyword inputs such as "
                f"{{'{main}': tensor, ...}}, got {type(inputs).__name__}"
            )
        if main not in inputs:
            raise InvalidInputError(
                f"example input needs {main!r} for {type(model).__name__}; got keys {sorted(inputs)}"
            )
        tensor = inputs[main]
        if main == "pixel_values":
            channels = int(getattr(model.config, "num_channels", tensor.shape[1] if tensor.dim() == 4 else 3))
            if tensor.dim() != 4 or tensor.shape[1] != channels:
                raise InvalidInputError(
                    f"pixel_values has shape {tuple(tensor.shape)}; {type(model).__name__} expects "
                    f"(B, {channels}, H, W)"
                )
        elif main == "input_ids" and (tensor.dim() != 2 or tensor.is_floating_point()):
            raise InvalidInputError(
                f"input_ids must be an integer tensor (B, L), got {tensor.dtype} {tuple(tensor.shape)}"
            )

    def num_classes(self, model: nn.Module) -> int | None:
        return _num_labels(model)

    def class_names(self, model: nn.Module) -> list[str] | None:
        id2label = getattr(model.config, "id2label", None) or {}
        return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(_num_labels(model))]

    def identity(self, model: nn.Module) -> str:
        return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)

    def layout_hint(self, model: nn.Module) -> str | None:
        return "NCHW"

    def architecture(self, model: nn.Module, **hints: Any) -> dict:
        name = type(model).__name__
        self._model_class(name)
        config = _config(model).to_dict()
        config.update(hints)
        return {"family": self.family, "class": name, "config": config}

    @staticmethod
    def _model_class(name: Any) -> type[PreTrainedModel]:
        import transformers

        if not isinstance(name, str) or not name.endswith(SUPPORTED_CLASS_SUFFIXES):
            raise UnsupportedModelError(
                f"transformers class {name!r} is not supported; supported classes end with {SUPPORTED_CLASS_SUFFIXES}"
            )
        cls = getattr(transformers, name, None)
        if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
            raise UnsupportedModelError(f"transformers {transformers.__version__} has no model class {name!r}")
        return cls

    def build(self, architecture: Mapping[str, Any]) -> nn.Module:
        cls = self._model_class(architecture.get("class"))
        config_dict = architecture.get("config")
        if not isinstance(config_dict, Mapping):
            raise UnsupportedModelError("transformers architecture has no config dict")
        assert cls.config_class is not None, "transformers' own model classes name their config class"
        try:
            config = cls.config_class.from_dict(dict(config_dict))
        except (TypeError, ValueError, KeyError) as exc:
            raise UnsupportedModelError(f"cannot rebuild the {cls.__name__} config: {exc}") from None
        with torch.device("meta"):
            return cls(config).eval()


def _config(model: nn.Module) -> PreTrainedConfig:
    """A transformers model's config (torch's stubs type every module attribute as a tensor or module)."""
    return cast("PreTrainedConfig", model.config)


def _num_labels(model: nn.Module) -> int:
    """A transformers classifier's class count."""
    count = _config(model).num_labels
    assert count is not None, "PreTrainedConfig always sets id2label, which num_labels counts"
    return count
