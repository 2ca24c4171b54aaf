"""Train and evaluate the small classifiers that the tests, examples and benchmarks need.

One loop (:func:`train_classifier`: AdamW, linear warm-up then cosine decay, seeded, tqdm) serves the source
and target models and every baseline: baselines that add a term to the loss (LwF's distillation, EWC's penalty)
pass it as ``extra_loss``; baselines that freeze weights (LoRA) just set ``requires_grad``, since only trainable
parameters are optimized. :func:`logits_of` reads logits from timm (tensor) and transformers (``ModelOutput``)
models alike, so nothing else needs to know which family a model is from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pnc_surgery.backends.base import logits_of
from pnc_surgery.errors import InvalidInputError

from .datasets import as_loader, labels_of, split_batch

__all__ = ["logits_of", "train_classifier", "predict_logits", "accuracy", "torch_threads", "ExtraLoss"]

ExtraLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``extra_loss(x, logits) -> scalar`` added to the cross-entropy of each training batch."""


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``, then restore the previous count. Tiny models train
    fastest on one thread, and seeded training then gives the same numbers on every machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _label_lookup(label_map: Mapping[int, int] | None) -> torch.Tensor | None:
    if label_map is None:
        return None
    lookup = torch.full((max(label_map) + 1,), -1, dtype=torch.long)
    for label, index in label_map.items():
        lookup[label] = index
    return lookup


def _cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_classifier(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int = 10,
    steps: int | None = None,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    label_map: Mapping[int, int] | None = None,
    extra_loss: ExtraLoss | None = None,
    balanced: bool = False,
    description: str = "train",
) -> nn.Module:
    """Train ``model`` with cross-entropy on a dataset of ``(x, y)`` pairs; return it in eval mode.

    Args:
        model: a classifier returning logits (tensor or ``ModelOutput``). Only parameters with
            ``requires_grad`` are optimized, so freezing is done by the caller.
        dataset: a Dataset of ``(image, label)`` pairs; shuffled with ``seed``.
        epochs, lr, weight_decay, batch_size: AdamW with 5% linear warm-up, then cosine decay to 0 (per step).
        steps: train for exactly this many optimizer steps instead of ``epochs`` (cycling through the data),
            so that big and small datasets can get the same compute budget.
        seed: seeds shuffling and any randomness in the model (dropout); the global RNG state is left as it was.
        progress: show a tqdm bar.
        label_map: maps dataset labels to output indices (e.g. ``{5: 0, 6: 1}``), when they differ.
        extra_loss: ``f(x, logits) -> scalar`` added to each batch's loss (distillation, penalties).
        balanced: sample class-balanced batches (see :func:`~benchmarks.datasets.as_loader`).
        description: the progress bar's label.

    Returns:
        The same ``model``, trained, in eval mode.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidInputError("the model has no trainable parameters")
    drop_last = len(dataset) > batch_size  # a batch of 1 breaks BatchNorm in train mode
    loader = as_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed, drop_last=drop_last, balanced=balanced)
    total_steps = max(1, steps if steps is not None else epochs * len(loader))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(total_steps, max(1, total_steps // 20))
    )
    lookup = _label_lookup(label_map)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        bar = tqdm(total=total_steps, desc=description, disable=not progress, leave=False)
        step = 0
        while step < total_steps:
            for batch in loader:
                if step == total_steps:
                    break
                x, y = split_batch(batch)
                if y is None:
                    raise InvalidInputError("training needs labelled batches (x, y)")
                if lookup is not None:
                    y = lookup[y]
                logits = logits_of(model(x))
                loss = F.cross_entropy(logits, y)
                if extra_loss is not None:
                    loss = loss + extra_loss(x, logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, data: Dataset | DataLoader | Iterable, batch_size: int = 256) -> torch.Tensor:
    """The model's logits for every example of ``data`` (dataset, loader or iterable of ``x``/``(x, y)``).

    Runs in eval mode without gradients and restores the model's previous mode.
    """
    was_training = model.training
    model.eval()
    try:
        outputs = [logits_of(model(split_batch(batch)[0])) for batch in as_loader(data, batch_size=batch_size)]
    finally:
        model.train(was_training)
    if not outputs:
        raise InvalidInputError("no examples to predict")
    return torch.cat(outputs)


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on a labelled dataset (labels must be the model's output indices)."""
    predictions = predict_logits(model, dataset, batch_size=batch_size).argmax(dim=1)
    return (predictions == labels_of(dataset)).float().mean().item()
