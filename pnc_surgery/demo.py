"""The whole story on built-in data: scikit-learn's digits, two small models, one patch.

A target learns digits 0-4 and a source digits 5-9; the patch clones 5, 6 and 7 from the source into the
target. The demo reports what a user would check: accuracy on the old and new classes, locality (how
many of the target's answers on its own classes stayed the same), that no target parameter changed, that
detaching gives back the exact original outputs, and how big the patch is.

The digits ship with scikit-learn, the demo's one extra dependency (``pip install "pnc_surgery[demo]"``);
the library itself does not need it. The split follows the benchmark's protocol (``benchmarks/README.md``)
at its defaults: 30% of the cloned digits' train images, 20 replay images per target digit.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .backends.base import logits_of
from .backends.timm import create_model
from .clone import CloneConfig, clone

__all__ = [
    "run_demo",
    "digits_models",
    "load_digits",
    "DigitsSplit",
    "digits_split",
    "train_classifier",
    "DEMO_CLONE_CONFIG",
    "TARGET_DIGITS",
    "SOURCE_DIGITS",
    "CLONED_DIGITS",
    "CLONE_SOURCE_IDS",
    "parameter_digest",
]

DEMO_CLONE_CONFIG = CloneConfig(max_cuts=3, max_insertions=3, search_steps=20, train_steps=400)
"""A budget that runs the demo in about a minute on two CPU cores."""

TARGET_DIGITS = (0, 1, 2, 3, 4)
SOURCE_DIGITS = (5, 6, 7, 8, 9)
CLONED_DIGITS = (5, 6, 7)
CLONE_SOURCE_IDS = tuple(SOURCE_DIGITS.index(d) for d in CLONED_DIGITS)
"""The cloned digits as the source's output indices (what ``clone(classes=...)`` takes)."""


@dataclass(frozen=True)
class DigitsSplit:
    """The demo's data, split by digit.

    Label spaces: ``target_train`` and ``replay`` hold digits 0-4 as labels 0-4; ``source_train`` and ``clone``
    hold digit ``d`` as ``d - 5`` (the source's output index, what ``clone(classes=...)`` takes); ``test`` holds
    digits 0-4 as 0-4 and ``CLONED_DIGITS[i]`` as ``5 + i`` (the patched target's outputs).
    """

    target_train: TensorDataset
    source_train: TensorDataset
    clone: TensorDataset
    replay: TensorDataset
    test: TensorDataset

    @property
    def num_old(self) -> int:
        """The target's own classes: the first cloned class's output index."""
        return len(TARGET_DIGITS)

    @property
    def clone_source_ids(self) -> tuple[int, ...]:
        """The cloned digits as the source's output indices."""
        return CLONE_SOURCE_IDS


def parameter_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer: equal digests mean not one value changed."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_digits(image_size: int = 16, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 digits as a stratified 2/3 train, 1/3 test split of ``(1, size, size)`` images.

    Args:
        image_size: side of the bilinearly resized images (the originals are 8x8).
        seed: seed of the split.

    Returns:
        ``(train, test)``, standardized with the train split's mean and std; labels are the digits.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError('the demo\'s digits ship with scikit-learn: pip install "pnc_surgery[demo]"') from exc

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, test = train_test_split(range(len(labels)), train_size=2 / 3, stratify=bunch.target, random_state=seed)
    train_index, test_index = torch.tensor(sorted(train)), torch.tensor(sorted(test))
    mean, std = images[train_index].mean(), images[train_index].std()
    return tuple(  # type: ignore[return-value]
        TensorDataset((images[index] - mean) / std, labels[index]) for index in (train_index, test_index)
    )


def _select(data: TensorDataset, classes: tuple[int, ...]) -> TensorDataset:
    """The examples of ``classes``, relabelled ``classes[i] -> i``."""
    images, labels = data.tensors
    keep = torch.isin(labels, torch.tensor(classes))
    lookup = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    return TensorDataset(images[keep], lookup[labels[keep]])


def _stratified(
    data: TensorDataset, seed: int, *, fraction: float = 1.0, per_class: int | None = None
) -> TensorDataset:
    """A seeded random subset: ``per_class`` images of each class, else ``fraction`` of each; original order kept."""
    images, labels = data.tensors
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        take = min(per_class, len(members)) if per_class is not None else max(1, round(len(members) * fraction))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    index = torch.sort(torch.cat(chosen)).values
    return TensorDataset(images[index], labels[index])


def digits_split(seed: int = 0) -> DigitsSplit:
    """The demo's split of the digits (see :class:`DigitsSplit`); ``seed`` draws the clone and replay images."""
    train, test = load_digits(image_size=16)
    source_train = _select(train, SOURCE_DIGITS)
    target_train = _select(train, TARGET_DIGITS)
    return DigitsSplit(
        target_train=target_train,
        source_train=source_train,
        clone=_stratified(_select(source_train, CLONE_SOURCE_IDS), seed, fraction=0.3),
        replay=_stratified(target_train, seed, per_class=20),
        test=_select(test, TARGET_DIGITS + CLONED_DIGITS),
    )


def train_classifier(
    model: nn.Module, data: TensorDataset, epochs: int = 8, seed: int = 0, progress: bool = True
) -> nn.Module:
    """Train a small classifier with cross-entropy, as the demo and the examples do.

    AdamW (lr 3e-3, weight decay 0.05) on shuffled batches of 64, 5% linear warm-up then cosine decay to 0.

    Args:
        model: returns logits (a tensor or a transformers ``ModelOutput``).
        data: ``(image, label)`` pairs.
        epochs: passes over ``data``.
        seed: seeds the shuffling and any randomness in the model; the global RNG state is left as it was.
        progress: show a progress bar.

    Returns:
        ``model``, trained, in eval mode.
    """
    loader = DataLoader(
        data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed), drop_last=len(data) > 64
    )
    total = max(1, epochs * len(loader))
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    with torch.random.fork_rng(devices=[]), tqdm(total=total, desc="train", disable=not progress, leave=False) as bar:
        torch.manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for x, y in loader:
                loss = F.cross_entropy(logits_of(model(x)), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update(1)
    return model.eval()


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``images``, in eval mode, in batches of 256."""
    return torch.cat([logits_of(model.eval()(images[i : i + 256])) for i in range(0, len(images), 256)])


def _small_resnet(num_classes: int) -> nn.Module:
    return create_model("resnet18", num_classes=num_classes, in_chans=1, channels=(16, 32, 64, 128))


def digits_models(seed: int = 0, epochs: int = 8, progress: bool = True) -> tuple[DigitsSplit, nn.Module, nn.Module]:
    """The demo's setting: the digits split, a target trained on 0-4 and a source trained on 5-9.

    Args:
        seed: seeds the initialization, the clone and replay draws, and training.
        epochs: training epochs of each model.
        progress: show progress bars.

    Returns:
        ``(split, target, source)``, both models small timm resnet18s in eval mode.
    """
    torch.manual_seed(seed)
    split = digits_split(seed)
    target, source = _small_resnet(len(TARGET_DIGITS)), _small_resnet(len(SOURCE_DIGITS))
    train_classifier(target, split.target_train, epochs, seed, progress)
    train_classifier(source, split.source_train, epochs, seed + 1, progress)
    return split, target, source


def run_demo(
    out_dir: str | Path | None = "pnc_demo_patch", *, seed: int = 0, epochs: int = 8, progress: bool = True
) -> dict[str, Any]:
    """Train a digits target and source, clone three classes, measure, and save the patch.

    Args:
        out_dir: where to save the patch (``None``: don't save).
        seed: seeds training, data subsampling and cloning.
        epochs: training epochs of the two small models.
        progress: show progress bars.

    Returns:
        The measurements, also printed by ``pnc-surgery demo``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the numbers then match on every machine
    try:
        return _run_demo(out_dir, seed, epochs, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir: str | Path | None, seed: int, epochs: int, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    split, target, source = digits_models(seed, epochs, progress)
    train_seconds = time.perf_counter() - started

    images, labels = split.test.tensors
    before_digest = parameter_digest(target)
    original = _logits(target, images)
    patch = clone(
        source,
        target,
        split.clone,
        classes=CLONE_SOURCE_IDS,
        replay=split.replay,
        config=DEMO_CLONE_CONFIG,
        seed=seed,
        progress=progress,
    )
    with patch.attached(target):
        patched = _logits(target, images)
    restored = _logits(target, images)

    prediction = patched.argmax(-1)
    old = labels < split.num_old
    results: dict[str, Any] = {
        "target_classes": list(TARGET_DIGITS),
        "cloned_classes": list(CLONED_DIGITS),
        "clone_images": len(split.clone),
        "replay_images": len(split.replay),
        "acc_old": (prediction[old] == labels[old]).float().mean().item(),
        "acc_new": (prediction[~old] == labels[~old]).float().mean().item(),
        "acc_all": (prediction == labels).float().mean().item(),
        "source_acc_on_cloned": _source_accuracy(source, images[~old], labels[~old] - split.num_old),
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


def _source_accuracy(source: nn.Module, images: torch.Tensor, cloned_index: torch.Tensor) -> float:
    """The source's accuracy on images of the cloned digits, choosing among the cloned digits only.

    Args:
        images: test images of the cloned digits.
        cloned_index: each image's digit as an index into ``CLONED_DIGITS``.
    """
    ids = torch.tensor(CLONE_SOURCE_IDS)
    return (_logits(source, images)[:, ids].argmax(-1) == cloned_index).float().mean().item()
