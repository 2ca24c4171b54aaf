"""The contract between the benchmark runner and the methods it compares.

A method is a function ``method(ctx: Context) -> Outcome``. The runner gives every method of a cell (pair, data
level, seed) the same :class:`Context`: the same source, its own untouched copy of the same target, the same
clone data and the same replay set. The method returns an :class:`Outcome`: a model that scores ``A`` then ``K``,
plus what the cost metrics need. Keeping this in one place is what makes the rows of the table comparable.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .datasets import ClassSplit, ImageDataset

__all__ = ["Hyper", "Context", "Outcome", "Method", "grow_head"]


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters shared by the baselines (one budget for all, so none is favoured).

    Attributes:
        steps: optimizer steps (batch ``batch_size``) every trained baseline gets.
        lr: AdamW learning rate of full fine-tuning, LwF and EWC.
        lora_lr: AdamW learning rate of LoRA (adapters start at zero and need a larger step).
        lora_rank: LoRA rank ``r`` (``lora_alpha = 2 r``).
        lwf_temperature, lwf_weight: LwF's distillation temperature and loss weight.
        ewc_lambda: EWC's penalty weight.
        balanced: draw class-balanced batches from clone data + replay set, so the few replay images are not
            drowned by the clone images (the usual rehearsal recipe; without it every trained baseline forgets
            A almost entirely).
    """

    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    lora_lr: float = 3e-3
    lora_rank: int = 4
    lwf_temperature: float = 2.0
    lwf_weight: float = 1.0
    ewc_lambda: float = 1000.0
    balanced: bool = True


@dataclass
class Context:
    """Everything a method may use. ``target`` is the method's own copy; ``original_target`` must stay untouched."""

    source: nn.Module
    target: nn.Module
    original_target: nn.Module
    split: ClassSplit
    hyper: Hyper
    seed: int
    progress: bool = False

    @property
    def num_old(self) -> int:
        return self.split.num_old

    @property
    def num_new(self) -> int:
        return len(self.split.clone_classes)

    @cached_property
    def joint_data(self) -> ImageDataset:
        """Clone data (relabelled to ``len(A) + i``) and replay set together: what the trained baselines fit."""
        clone, replay = self.split.clone, self.split.replay
        lookup = torch.full((int(clone.labels.max()) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(self.split.clone_source_ids)] = torch.arange(self.num_new) + self.num_old
        images = torch.cat([replay.images, clone.images])
        labels = torch.cat([replay.labels, lookup[clone.labels]])
        return replay.with_tensors(images, labels, class_names=())


@dataclass
class Outcome:
    """What a method hands back.

    Attributes:
        model: scores ``len(A) + len(K)`` classes: A's in the target's order, then K's in ``split.clone_classes`` order.
        changed: the module whose parameters replace the target's in deployment (compared with the original).
        extra_params: parameter elements added on top of the target.
        patch_bytes: bytes one must ship to turn the target into ``model``.
        seconds: wall time of the method (training / cloning).
        release: undo what can be undone and return the model that is left (PNC: detach; ensemble: drop S;
            LoRA: disable the adapter); ``None`` when the target's weights were overwritten for good.
        notes: method-specific facts for the JSON (e.g. the chosen cut point).
    """

    model: nn.Module
    changed: nn.Module
    extra_params: int
    patch_bytes: int
    seconds: float
    release: Callable[[], nn.Module] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


Method = Callable[[Context], Outcome]


def grow_head(model: nn.Module, head: str, num_new: int, seed: int) -> nn.Module:
    """A deep copy of ``model`` whose final linear layer ``head`` scores ``num_new`` more classes.

    The old rows (weights and biases) are copied from the model, so before any training the old classes'
    logits are exactly the original ones; the new rows keep PyTorch's default (seeded) initialisation.
    """
    grown = copy.deepcopy(model)
    old = grown.get_submodule(head)
    assert isinstance(old, nn.Linear), f"{head} is a {type(old).__name__}, not nn.Linear"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, old.out_features + num_new, bias=old.bias is not None)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        if old.bias is not None:
            new.bias[: old.out_features] = old.bias
    parent_name, _, child = head.rpartition(".")
    setattr(grown.get_submodule(parent_name) if parent_name else grown, child, new)
    return grown
