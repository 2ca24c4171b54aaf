"""The backend interface: what the library asks of a model family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InvalidInputError, UnsupportedModelError

__all__ = [
    "Backend",
    "ModelInputs",
    "call_model",
    "main_tensor",
    "logits_of",
    "replace_logits",
    "image_size",
    "ordinary_tokens",
]

ModelInputs = torch.Tensor | Mapping[str, torch.Tensor]
"""What a model is called with: one tensor (timm, plain torch) or keyword tensors (transformers)."""


def call_model(model: nn.Module, inputs: ModelInputs) -> Any:
    """Call ``model`` on positional or keyword inputs."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def main_tensor(inputs: ModelInputs, main_input_name: str) -> torch.Tensor:
    """The input tensor that carries the data (pixels or token ids), as opposed to masks."""
    if isinstance(inputs, Mapping):
        if main_input_name not in inputs:
            raise InvalidInputError(f"example input has no {main_input_name!r}; got keys {sorted(inputs)}")
        return inputs[main_input_name]
    return inputs


def _logits_index(output: Any) -> int | str:
    """Where a model output keeps its logits: ``"logits"``, else the first tensor that is not a scalar loss (a
    ``return_dict=False`` tuple, or a ``ModelOutput`` that names them otherwise, as PPLCNet's ``last_hidden_state``)."""
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return "logits"
        items: list[tuple[int | str, Any]] = list(output.items())
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    else:
        items = []
    for key, item in items:
        if isinstance(item, torch.Tensor) and item.dim() >= 1:
            return key
    raise UnsupportedModelError(f"cannot find logits in a model output of type {type(output).__name__}")


def logits_of(output: Any) -> torch.Tensor:
    """The logits of any classifier output: a tensor (timm), a ``ModelOutput`` or dict with ``logits``
    (transformers), or a tuple whose first non-scalar tensor they are (``return_dict=False``, loss first)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return output[_logits_index(output)]


def replace_logits(output: Any, logits: torch.Tensor) -> Any:
    """``output`` with its logits replaced (same container; a ``ModelOutput`` is updated in place)."""
    if isinstance(output, torch.Tensor):
        return logits
    index = _logits_index(output)
    if isinstance(index, str):
        output[index] = logits
        return output
    items = list(output)
    items[index] = logits
    return type(output)(items) if isinstance(output, list) else tuple(items)


def image_size(inputs: ModelInputs) -> tuple[int, int] | None:
    """``(H, W)`` of the image in ``inputs`` (a 4-D floating tensor, alone or among keyword tensors); ``None``
    for text."""
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs.values())
    image = next((t for t in tensors if t.is_floating_point() and t.dim() == 4), None)
    return None if image is None else (int(image.shape[-2]), int(image.shape[-1]))


def ordinary_tokens(
    vocab: int, special: Sequence[int], shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    """Random token ids in ``[0, vocab)`` that are none of the ``special`` ids (pad, eos, ...)."""
    drawn = torch.randint(0, vocab - len(set(special)), shape, generator=generator)
    for token in sorted(set(special)):
        drawn += (drawn >= token).long()
    return drawn


class Backend:
    """Family knowledge. Subclasses override what differs; defaults fit plain ``nn.Module`` classifiers."""

    family: ClassVar[str] = "torch"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether this backend knows ``model``'s family."""
        raise NotImplementedError

    def main_input_name(self, model: nn.Module) -> str:
        """Name of the data input (a keyword for transformers, a label otherwise)."""
        return "x"

    def example_input(self, model: nn.Module, batch_size: int = 2, seed: int = 0) -> ModelInputs:
        """An input the model accepts, built from its own configuration."""
        raise UnsupportedModelError(
            f"cannot build an example input for {type(model).__name__}: pass example_input explicitly"
        )

    def second_input(self, model: nn.Module, inputs: ModelInputs, seed: int = 1) -> ModelInputs:
        """Another input of the same shape and kind with different data.

        Masks are kept, and so are token ids at masked positions and special tokens (pad, bos, eos, sep):
        a model that pools the last non-pad token (GPT-2) or the last eos (BART) must pool the same position
        in both inputs. New ids are drawn from the vocabulary without the special ids, or, when the
        vocabulary size is unknown, from the ordinary ids the input holds.
        """
        x = main_tensor(inputs, self.main_input_name(model))
        gen = torch.Generator().manual_seed(seed)
        if x.is_floating_point():
            other = torch.randn(x.shape, generator=gen).to(x) * (x.std().clamp_min(1.0)) + x.mean()
            return self.replace_main(model, inputs, other)
        vocab = self.vocab_size(model)
        special = sorted(i for i in self.special_token_ids(model) if not vocab or i < vocab)
        kept = torch.isin(x, torch.tensor(special, dtype=x.dtype, device=x.device))
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if isinstance(mask, torch.Tensor) and mask.shape == x.shape:
            kept |= mask == 0
        if vocab and vocab > len(special):
            drawn = ordinary_tokens(int(vocab), special, tuple(x.shape), gen)
        else:
            seen = x[~kept] if (~kept).any() else x.flatten()
            drawn = seen.flatten()[torch.randint(0, seen.numel(), x.shape, generator=gen)]
        return self.replace_main(model, inputs, torch.where(kept, x, drawn.to(x)))

    def replace_main(self, model: nn.Module, inputs: ModelInputs, tensor: torch.Tensor) -> ModelInputs:
        """``inputs`` with the data tensor replaced (masks and other keywords kept)."""
        if isinstance(inputs, Mapping):
            return {**inputs, self.main_input_name(model): tensor}
        return tensor

    def vocab_size(self, model: nn.Module) -> int | None:
        """Size of the token vocabulary for text models."""
        return None

    def call_inputs(self, model: nn.Module, inputs: ModelInputs) -> ModelInputs:
        """``inputs`` in the form the model is called with: a data tensor as it is (keyword families wrap it)."""
        return inputs

    def expected_image(self, model: nn.Module) -> tuple[int, tuple[int, int]] | None:
        """``(channels, (H, W))`` of the images ``model`` expects by its own config; ``None`` for text models."""
        try:
            example = main_tensor(self.example_input(model, batch_size=1), self.main_input_name(model))
        except (UnsupportedModelError, InvalidInputError):
            return None
        if example.dim() != 4 or not example.is_floating_point():
            return None
        return int(example.shape[1]), (int(example.shape[2]), int(example.shape[3]))

    def pad_token_id(self, model: nn.Module) -> int | None:
        """The token id that marks padding for text models, where the model says so."""
        return None

    def eos_token_id(self, model: nn.Module) -> int | None:
        """The token id that ends a text for text models, where the model says so (the first, if several)."""
        return None

    def special_token_ids(self, model: nn.Module) -> set[int]:
        """Token ids that mark structure rather than content (pad, bos, eos, sep, cls) for text models."""
        pad = self.pad_token_id(model)
        return set() if pad is None else {pad}

    def normalization(self, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Per-channel ``(mean, std)`` the model's images are normalised with, where the model records it."""
        return None

    def check_input(self, model: nn.Module, inputs: ModelInputs) -> None:
        """Raise :class:`InvalidInputError` if ``inputs`` cannot be what the model takes (cheap checks only)."""
        if not isinstance(inputs, (torch.Tensor, Mapping)):
            raise InvalidInputError(
                f"example_input must be a tensor or a mapping of tensors, got {type(inputs).__name__}"
            )

    def logits(self, output: Any) -> torch.Tensor:
        """The logits tensor of a model output."""
        return logits_of(output)

    def with_logits(self, output: Any, logits: torch.Tensor) -> Any:
        """``output`` with its logits replaced by ``logits`` (same container type)."""
        return replace_logits(output, logits)

    def num_classes(self, model: nn.Module) -> int | None:
        """Number of classes the model scores, where the model says so."""
        return None

    def class_names(self, model: nn.Module) -> list[str] | None:
        """Human-readable class names by class id, where the model has them."""
        return None

    def identity(self, model: nn.Module) -> str:
        """A short id of the architecture, for fingerprints and model cards."""
        return type(model).__name__

    def layout_hint(self, model: nn.Module) -> str | None:
        """The layout of 4-D features when shapes alone cannot tell (``"NCHW"`` or ``"NHWC"``)."""
        return None

    def prefix_tokens(self, model: nn.Module) -> int | None:
        """How many non-patch tokens (cls, distillation, registers) lead a token sequence."""
        return None

    def architecture(self, model: nn.Module, **hints: Any) -> dict:
        """A JSON description from which :meth:`build` recreates the model without its weights."""
        raise UnsupportedModelError(
            f"{type(model).__name__} is neither a timm nor a transformers model: its architecture cannot be "
            "recorded, so a patch cut from it cannot be saved (it still works in memory)"
        )

    def build(self, architecture: Mapping[str, Any]) -> nn.Module:
        """Recreate a model from :meth:`architecture`'s description (weights uninitialised, on the meta device
        where possible)."""
        raise UnsupportedModelError(f"family {self.family!r} cannot rebuild models")
