"""The whole story on built-in data: scikit-learn's digits, two small models, one patch.

A target learns digits 0-4 and a source digits 5-9; the patch clones 5, 6 and 7 from the source into the
target. The demo reports what a user would check: accuracy on the old and new classes, locality (how
many of the target's answers on its own classes stayed the same), that no target parameter changed, that
detaching gives back the exact original outputs, and how big the patch is.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends.timm import create_model
from .clone import CloneConfig, clone
from .datasets import class_split, load_digits
from .training import predict_logits, torch_threads, train_classifier

__all__ = ["run_demo", "digits_models", "DEMO_CLONE_CONFIG", "parameter_digest"]

DEMO_CLONE_CONFIG = CloneConfig(max_cuts=3, max_insertions=3, search_steps=20, train_steps=400)
"""A budget that runs the demo in about a minute on two CPU cores."""


def parameter_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer: equal digests mean not one value changed."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _small_resnet(num_classes: int) -> nn.Module:
    return create_model("resnet18", num_classes=num_classes, in_chans=1, channels=(16, 32, 64, 128))


def digits_models(seed: int = 0, epochs: int = 8, progress: bool = True) -> tuple[Any, nn.Module, nn.Module]:
    """The demo's setting: the digits class split, a target trained on 0-4 and a source trained on 5-9.

    Returns:
        ``(split, target, source)``; ``split`` is a :class:`~pnc_surgery.datasets.ClassSplit` (30% clone data,
        20 replay images per target class).
    """
    torch.manual_seed(seed)
    train, test = load_digits(image_size=16)
    split = class_split(train, test, clone_level=0.3, replay_per_class=20, seed=seed)
    target, source = _small_resnet(len(split.target_classes)), _small_resnet(len(split.source_classes))
    train_classifier(target, split.target_train, epochs=epochs, seed=seed, progress=progress)
    train_classifier(source, split.source_train, epochs=epochs, seed=seed + 1, progress=progress)
    return split, target, source


def run_demo(out_dir: str | Path | None = "pnc_demo_patch", *, seed: int = 0, epochs: int = 8, progress: bool = True) -> dict[str, Any]:
    """Train a digits target and source, clone three classes, measure, and save the patch.

    Args:
        out_dir: where to save the patch (``None``: don't save).
        seed: seeds training, data subsampling and cloning.
        epochs: training epochs of the two small models.
        progress: show progress bars.

    Returns:
        The measurements, also printed by ``pnc-surgery demo``.
    """
    with torch_threads(1):  # the numbers then match on every machine
        return _run_demo(out_dir, seed, epochs, progress)


def _run_demo(out_dir: str | Path | None, seed: int, epochs: int, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    split, target, source = digits_models(seed, epochs, progress)
    train_seconds = time.perf_counter() - started

    before_digest = parameter_digest(target)
    original = predict_logits(target, split.test)
    patch = clone(source, target, split.clone, classes=split.clone_source_ids, replay=split.replay, config=DEMO_CLONE_CONFIG, seed=seed, progress=progress)
    with patch.attached(target):
        patched = predict_logits(target, split.test)
    restored = predict_logits(target, split.test)

    labels = split.test.tensors[1]
    prediction = patched.argmax(-1)
    old = labels < split.num_old
    results: dict[str, Any] = {
        "target_classes": list(split.target_classes),
        "cloned_classes": list(split.clone_classes),
        "clone_images": len(split.clone),
        "replay_images": len(split.replay),
        "acc_old": (prediction[old] == labels[old]).float().mean().item(),
        "acc_new": (prediction[~old] == labels[~old]).float().mean().item(),
        "acc_all": (prediction == labels).float().mean().item(),
        "source_acc_on_cloned": _source_accuracy(source, split),
        "target_acc_before": (original[old].argmax(-1) == labels[old]).float().mean().item(),
        "locality": (prediction[old] == original[old].argmax(-1)).float().mean().item(),
        "target_params_changed": int(parameter_digest(target) != before_digest),
        "detach_max_abs_diff": (restored - original).abs().max().item(),
        "patch_parameters": patch.num_parameters,
        "source_parameters": sum(p.numel() for p in source.parameters()),
        "train_seconds": round(train_seconds, 1),
        "clone_seconds": patch.metrics["clone_seconds"],
        "cut": patch.metrics["cut"],
        "insertion": patch.metrics["insertion"],
    }
    if out_dir is not None:
        folder = patch.save_pretrained(out_dir)
        results["patch_dir"] = str(folder)
        results["patch_bytes"] = sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix == ".safetensors")
    return results


def _source_accuracy(source: nn.Module, split: Any) -> float:
    """The source's own accuracy on the test images of the cloned classes (over the cloned classes only)."""
    labels = split.test.tensors[1]
    new = labels >= split.num_old
    logits = predict_logits(source, torch.utils.data.TensorDataset(split.test.tensors[0][new], labels[new]))
    predicted = torch.tensor(split.clone_source_ids)[logits[:, list(split.clone_source_ids)].argmax(-1)]
    wanted = torch.tensor(split.clone_source_ids)[labels[new] - split.num_old]
    return (predicted == wanted).float().mean().item()
