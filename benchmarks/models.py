"""The architectures and architecture pairs of the benchmark, and the on-disk cache of trained models.

Every architecture is small enough to train on two CPU cores in seconds to a minute at 16-28 px; what matters
for the comparison is that every method sees exactly the same source and target. Trained models are saved as
safetensors under ``<cache>/<dataset>/``, keyed by everything that changes them (architecture and its config,
role, classes, image size, training budget, seed), so a rerun only measures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from pnc_surgery.backends.timm import create_model

from .datasets import ImageDataset, subsample
from .training import accuracy, train_classifier

__all__ = ["Arch", "ARCHS", "MATRIX_ARCHS", "PAIRS", "build_model", "head_name", "count_parameters", "trained_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """An architecture of the benchmark.

    Attributes:
        family: ``"timm"`` (``kwargs`` go to ``timm.create_model(name)``), ``"transformers"`` (``kwargs`` go
            to the ``AutoConfig`` of ``name``, e.g. ``"vit"``) or ``"transformers-text"`` (the same, a sequence
            classifier).
        name: the timm model name or the transformers ``model_type``.
        kwargs: the size of the model; ``img_size``/``image_size`` and channels are filled in at build time.
        lr: AdamW learning rate for training it from scratch.
    """

    family: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 3e-3


ARCHS: dict[str, Arch] = {
    "resnet": Arch("timm", "resnet18", dict(channels=(16, 32, 64, 128))),
    "efficientnet": Arch("timm", "test_efficientnet"),
    "convnext": Arch("timm", "convnext_atto", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), output_stride=16)),
    "vit": Arch("timm", "vit_tiny_patch16_224", dict(patch_size=4, embed_dim=64, depth=4, num_heads=4), lr=1e-3),
    "hf_vit": Arch(
        "transformers",
        "vit",
        dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, patch_size=4),
        lr=1e-3,
    ),
}
"""Architectures by short name. ``convnext`` has output stride 16 (its last stage dilated) so it runs at 16 px."""

MATRIX_ARCHS: dict[str, Arch] = {
    "resnet18": Arch("timm", "resnet18", lr=1e-3),
    "mobilenetv3": Arch("timm", "mobilenetv3_small_100", lr=1e-3),
    "convnext_atto": Arch("timm", "convnext_atto", lr=1e-3),
    "deit_tiny": Arch("timm", "deit_tiny_patch16_224", dict(patch_size=8), lr=5e-4),
    "mixer": Arch("timm", "mixer_s16_224", dict(img_size=32), lr=5e-4),
    "mobilevit": Arch("timm", "mobilevit_xxs", lr=1e-3),
    "levit": Arch("timm", "levit_128s", dict(img_size=32), lr=1e-3),
    "hf_vit_small": Arch(
        "transformers",
        "vit",
        dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, patch_size=8),
        lr=5e-4,
    ),
    "bert": Arch(
        "transformers-text",
        "bert",
        dict(
            vocab_size=256,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=64,
        ),
        lr=5e-4,
    ),
    "distilbert": Arch(
        "transformers-text",
        "distilbert",
        dict(vocab_size=256, dim=128, n_layers=4, n_heads=4, hidden_dim=512, max_position_embeddings=64),
        lr=5e-4,
    ),
}
"""The pair matrix's architectures (:mod:`benchmarks.pair_matrix`): timm default widths at 32 px (ViT and MLP
patch sizes shrunk so that 32 px gives several tokens), and transformers models of the sizes of small released
checkpoints; ``transformers-text`` models are sequence classifiers."""
ARCHS.update(MATRIX_ARCHS)

PAIRS: dict[str, tuple[str, str]] = {
    "resnet->resnet": ("resnet", "resnet"),
    "convnext->resnet": ("convnext", "resnet"),
    "resnet->efficientnet": ("resnet", "efficientnet"),
    "vit->vit": ("vit", "vit"),
    "resnet->vit": ("resnet", "vit"),
    "hf_vit->hf_vit": ("hf_vit", "hf_vit"),
}
"""``"source->target"``: same family, different CNN families, ViT, CNN to ViT, and a transformers model."""


def build_model(arch: str, num_classes: int, image_size: int, channels: int, seed: int) -> nn.Module:
    """A freshly initialised (seeded) classifier of architecture ``arch``, in eval mode."""
    spec = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.family == "timm":
            kwargs = dict(spec.kwargs)
            if "patch_size" in kwargs or "img_size" in kwargs:  # fixed position embeddings need the size
                kwargs["img_size"] = image_size
            model = create_model(spec.name, num_classes=num_classes, in_chans=channels, **kwargs)
        elif spec.family == "transformers-text":
            from transformers import AutoConfig, AutoModelForSequenceClassification

            config = AutoConfig.for_model(spec.name, num_labels=num_classes, **spec.kwargs)
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            from transformers import AutoConfig, AutoModelForImageClassification

            config = AutoConfig.for_model(
                spec.name, image_size=image_size, num_channels=channels, num_labels=num_classes, **spec.kwargs
            )
            model = AutoModelForImageClassification.from_config(config)
    return model.eval()


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier's final ``nn.Linear`` (``fc``, ``head``, ``head.fc``, ``classifier``)."""
    declared = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(declared, str) and isinstance(model.get_submodule(declared), nn.Linear):
        return declared
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    assert linears, f"{type(model).__name__} has no nn.Linear head"
    return linears[-1]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters once)."""
    return sum(p.numel() for p in model.parameters())


def _cache_key(arch: str, role: str, classes: tuple[int, ...], image_size: int, steps: int, seed: int) -> str:
    spec = json.dumps(
        {"arch": asdict(ARCHS[arch]), "role": role, "classes": classes, "image_size": image_size, "steps": steps},
        sort_keys=True,
        default=str,
    )
    return f"{arch}_{role}_{image_size}px_seed{seed}_{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def trained_model(
    arch: str,
    role: str,
    train: ImageDataset,
    classes: tuple[int, ...],
    *,
    dataset_name: str,
    image_size: int,
    steps: int,
    seed: int,
    cache_dir: Path,
    train_per_class: int | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """The ``role`` (``"source"``/``"target"``) model trained on ``train`` (labels already ``0..n-1``), cached.

    Args:
        train: the role's training images, labels indexing ``classes``.
        classes: the dataset classes behind the labels (part of the cache key).
        steps: optimizer steps (batch 64) to train for.
        train_per_class: train on this many images per class only (a seeded subsample), to bound CPU time.

    Returns:
        ``(model, info)``: the model in eval mode, and a dict with the cache path, whether it was a hit and the
        training seconds.
    """
    key = _cache_key(arch, role, classes, image_size, steps, seed) + (f"_n{train_per_class}" if train_per_class else "")
    path = Path(cache_dir) / dataset_name / f"{key}.safetensors"
    channels = int(train.images.shape[1])
    model = build_model(arch, len(classes), image_size, channels, seed)
    if path.is_file():
        load_model(model, str(path))
        return model.eval(), {"cache": str(path), "cache_hit": True, "train_seconds": 0.0}
    data = subsample(train, per_class=train_per_class, seed=seed) if train_per_class else train
    start = time.perf_counter()
    train_classifier(
        model, data, steps=steps, lr=ARCHS[arch].lr, seed=seed, progress=progress, description=f"{role} {arch}"
    )
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))
    logger.info("trained %s %s in %.1fs (train acc %.3f) -> %s", role, arch, seconds, accuracy(model, data), path)
    return model, {"cache": str(path), "cache_hit": False, "train_seconds": seconds}
