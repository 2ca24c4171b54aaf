"""timm classifiers: example inputs from the data config, architecture as (name, kwargs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from ..errors import InvalidInputError, UnsupportedModelError
from .base import Backend, ModelInputs

__all__ = ["TimmBackend", "create_model", "MODEL_KWARGS_ATTR"]

MODEL_KWARGS_ATTR = "pnc_model_kwargs"
"""Attribute where :func:`create_model` records the keyword arguments a timm model was built with."""


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that remembers its keyword arguments, so a patch cut from it can be rebuilt.

    timm does not keep the kwargs of ``create_model``; models built with non-default widths, depths or
    resolutions need them to be rebuilt from a patch file. Plain ``timm.create_model`` works too when only
    ``num_classes``, ``in_chans`` and ``img_size`` differ from the defaults.
    """
    import timm

    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    setattr(model, MODEL_KWARGS_ATTR, dict(kwargs))
    return model


def _first_conv(model: nn.Module) -> nn.Module | None:
    """The input convolution named by ``pretrained_cfg['first_conv']``, else the model's first ``Conv2d`` (unless
    the model states its ``in_chans``: a stem that is not a convolution, as CSATv2's DCT, reads the image)."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    for name in names:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    if isinstance(getattr(model, "in_chans", None), int):
        return None
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _built_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The ``img_size`` the model was built with, from whichever module keeps it (``patch_embed``, ``stem``, ...).

    timm models built with ``img_size=`` keep it on their patch embedding, whatever its name; ``pretrained_cfg``
    still says the default size. ``None`` when no module records a fixed size (CNNs take any size).
    """
    for module in model.modules():
        size = getattr(module, "img_size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return int(size[0]), int(size[1])
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UnsupportedModelError(f"timm model kwarg value {value!r} is not JSON-serialisable; pass plain values")


class TimmBackend(Backend):
    """Models built by ``timm.create_model``."""

    family = "timm"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return hasattr(model, "pretrained_cfg") and type(model).__module__.startswith("timm.")

    def in_chans(self, model: nn.Module) -> int:
        channels = getattr(_first_conv(model), "in_channels", None)
        if channels is not None:  # after a space-to-depth stem (TResNet) the first conv sees block_size**2 times more
            folds = [m.bs for m in model.modules() if type(m).__name__ == "SpaceToDepth" and isinstance(m.bs, int)]
            return int(channels) // (folds[0] ** 2 if folds else 1)
        declared = getattr(model, "in_chans", None)
        if isinstance(declared, int):
            return declared
        return int(_pretrained_cfg(model).get("input_size", (3,))[0])

    def image_size(self, model: nn.Module) -> tuple[int, int]:
        size = _built_image_size(model)
        if size is not None:
            return size
        from timm.data import resolve_model_data_config

        _, height, width = resolve_model_data_config(model)["input_size"]
        return int(height), int(width)

    def example_input(self, model: nn.Module, batch_size: int = 2, seed: int = 0) -> ModelInputs:
        height, width = self.image_size(model)
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size, self.in_chans(model), height, width, generator=gen)

    def check_input(self, model: nn.Module, inputs: ModelInputs) -> None:
        super().check_input(model, inputs)
        if not isinstance(inputs, torch.Tensor):
            raise InvalidInputError(f"timm models take one image tensor (B, C, H, W), got {type(inputs).__name__}")
        expected = (self.in_chans(model), *self.image_size(model))
        if inputs.dim() != 4 or inputs.shape[1] != expected[0]:
            raise InvalidInputError(
                f"example input has shape {tuple(inputs.shape)}; {type(model).__name__} expects (B, C, H, W) "
                f"with C={expected[0]} (e.g. {(2, *expected)})"
            )

    def num_classes(self, model: nn.Module) -> int | None:
        count = getattr(model, "num_classes", None)
        return None if count is None else int(count)

    def class_names(self, model: nn.Module) -> list[str] | None:
        names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
        return list(names) if names else None

    def normalization(self, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(model)
        mean, std = config.get("mean"), config.get("std")
        return (tuple(float(m) for m in mean), tuple(float(s) for s in std)) if mean and std else None

    def identity(self, model: nn.Module) -> str:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return str(cfg.get("hf_hub_id") or f"timm/{cfg.get('architecture', type(model).__name__)}")

    def layout_hint(self, model: nn.Module) -> str | None:
        fmt = getattr(model, "output_fmt", None)
        return str(getattr(fmt, "value", fmt)) if fmt else None

    def prefix_tokens(self, model: nn.Module) -> int | None:
        count = getattr(model, "num_prefix_tokens", None)
        return int(count) if count is not None else None

    def architecture(self, model: nn.Module, **hints: Any) -> dict:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if not name:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no pretrained_cfg['architecture']; build it with timm.create_model"
            )
        kwargs = dict(getattr(model, MODEL_KWARGS_ATTR, None) or {})
        if not kwargs:
            kwargs = {"num_classes": int(cast(int, model.num_classes)), "in_chans": self.in_chans(model)}
            size = _built_image_size(model)
            if size is not None and size != tuple(_pretrained_cfg(model).get("input_size", (3, *size))[1:]):
                kwargs["img_size"] = list(size)
        kwargs.update(hints)
        kwargs.pop("pretrained", None)
        architecture = {"family": self.family, "name": name, "kwargs": _jsonable(kwargs)}
        self._check_rebuild(model, architecture)
        return architecture

    def _check_rebuild(self, model: nn.Module, architecture: dict) -> None:
        """Refuse to record an architecture that would rebuild into different tensor shapes."""
        rebuilt = self.build(architecture)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        if ours != theirs:
            diff = sorted(set(ours.items()) ^ set(theirs.items()))[:4]
            raise UnsupportedModelError(
                f"timm.create_model({architecture['name']!r}, **{architecture['kwargs']}) does not rebuild this "
                f"model (first differences: {diff}). Build it with pnc_surgery.backends.timm.create_model(...) "
                f"or set model.{MODEL_KWARGS_ATTR} = dict(<the create_model kwargs>)"
            )

    def build(self, architecture: Mapping[str, Any]) -> nn.Module:
        import timm

        name, kwargs = architecture["name"], dict(architecture.get("kwargs") or {})
        if not isinstance(name, str) or name not in timm.list_models():
            raise UnsupportedModelError(f"timm has no model named {name!r} (timm {timm.__version__})")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        try:
            with torch.device("meta"):  # never on the CPU: the sizes may come from an untrusted patch file
                return timm.create_model(name, pretrained=False, **kwargs)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            raise UnsupportedModelError(
                f"timm.create_model({name!r}) cannot be built on the meta device: {exc}"
            ) from None
        except TypeError as exc:
            raise UnsupportedModelError(f"timm.create_model({name!r}) rejected the recorded kwargs: {exc}") from None


def _pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """A timm model's ``pretrained_cfg`` (torch's stubs type every module attribute as a tensor or module)."""
    return cast(dict[str, Any], model.pretrained_cfg)
