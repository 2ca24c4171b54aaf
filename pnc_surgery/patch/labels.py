"""Label names of a patched target: the target's own, then each attached patch's cloned classes.

A transformers model names its outputs in ``config.id2label`` / ``label2id`` (``num_labels`` is their length),
and pipelines read them, so attaching a patch extends them with the cloned classes' names (made unique against
the names already there) and detaching restores the very objects that were there before. The original maps
are kept on the model under :data:`SAVED_ATTR` while any patch is attached; parameters, buffers and
``state_dict`` are not touched. timm models carry no such map; :func:`target_labels` reads their
``pretrained_cfg`` label names where present.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["SAVED_ATTR", "attached_patches", "refresh", "target_labels", "unique_names"]

SAVED_ATTR = "_pnc_surgery_saved_labels"


def target_labels(model: nn.Module, num_classes: int) -> list[str]:
    """Names of the target's own ``num_classes`` outputs (``class_<i>`` where the model has none)."""
    saved = model.__dict__.get(SAVED_ATTR)
    config = getattr(model, "config", None)
    id2label: dict[Any, Any] = dict(saved[0] if saved is not None else getattr(config, "id2label", None) or {})
    if not id2label:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        id2label = dict(enumerate(cfg.get("label_names") or _imagenet_names(model, num_classes) or []))
    return [str(id2label.get(i, id2label.get(str(i), f"class_{i}"))) for i in range(num_classes)]


def _imagenet_names(model: nn.Module, num_classes: int) -> list[str] | None:
    """timm's ImageNet label descriptions when the model's pretrained config names an ImageNet subset."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:
        return None
    subset = infer_imagenet_subset(model)
    if not subset:
        return None
    info = ImageNetInfo(subset)
    names = info.label_descriptions(as_dict=False) if hasattr(info, "label_descriptions") else None
    return list(names) if names is not None and len(names) == num_classes else None


def unique_names(names: Sequence[str], taken: Sequence[str]) -> list[str]:
    """``names`` with a `` (2)``-style suffix where one is already in ``taken`` or earlier in ``names``."""
    used, result = set(taken), []
    for name in names:
        candidate, n = str(name), 2
        while candidate in used:
            candidate, n = f"{name} ({n})", n + 1
        used.add(candidate)
        result.append(candidate)
    return result


def attached_patches(model: nn.Module) -> list[Any]:
    """The patches attached to ``model``, in attach order (read from its hooks)."""
    from .hooks import Attachment

    owners = [getattr(hook, "__self__", None) for hook in model._forward_hooks.values()]
    return [owner.patch for owner in owners if isinstance(owner, Attachment)]


def refresh(model: nn.Module, num_classes: int) -> None:
    """Make a transformers model's label maps name its outputs as they are now; restore them when no patch is left."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "id2label"):
        return
    patches = attached_patches(model)
    saved = model.__dict__.get(SAVED_ATTR)
    if not patches:
        if saved is not None:
            config.id2label, config.label2id = saved
            del model.__dict__[SAVED_ATTR]
        return
    if saved is None:
        saved = model.__dict__[SAVED_ATTR] = (config.id2label, config.label2id)
    names = target_labels(model, num_classes)
    for patch in patches:
        names += unique_names(patch.class_names, names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
