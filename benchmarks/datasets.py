"""Small offline image datasets and the class-split protocol (benchmarks/README.md) of the benchmarks and tests.

Everything here returns :class:`ImageDataset`, a :class:`torch.utils.data.TensorDataset` of float32 images
``(C, H, W)`` scaled to roughly zero mean and unit std, and int64 labels, that also records where its images
came from (``source``) and the names of its classes. Tensors in memory keep the CPU benchmarks fast and make
every split and subsample exactly reproducible from a seed.

Loaders:
    * :func:`load_digits`: scikit-learn's 8x8 digits (ships with scikit-learn, always offline).
    * :func:`load_fashion_mnist`: the IDX files of Debian's ``dataset-fashion-mnist``, or torchvision.
    * :func:`load_mnist`: IDX files in a folder you name, or torchvision.

Helpers: :func:`select_classes`, :func:`subsample`, :func:`class_split` (the BENCHMARK.md protocol) and
:func:`as_loader`/:func:`split_batch`, which let every training and evaluation loop accept a dataset, a
DataLoader or any iterable of batches.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset, WeightedRandomSampler

from pnc_surgery.errors import InvalidInputError

__all__ = [
    "ImageDataset",
    "ClassSplit",
    "FASHION_MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "load_digits",
    "load_fashion_mnist",
    "load_fashion_mnist_pixels",
    "load_mnist",
    "tensors_of",
    "labels_of",
    "select_classes",
    "subsample",
    "take_level",
    "class_split",
    "as_loader",
    "split_batch",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class ImageDataset(TensorDataset):
    """A TensorDataset of ``(image, label)`` pairs that remembers its origin.

    Attributes:
        source: where the images came from (a path, ``"sklearn"``, ``"torchvision:<root>"``), for reports.
        class_names: one name per label index.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, source: str, class_names: Sequence[str]):
        assert images.shape[0] == labels.shape[0], f"{images.shape[0]} images but {labels.shape[0]} labels"
        super().__init__(images, labels.long())
        self.source = source
        self.class_names = tuple(class_names)

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    def with_tensors(
        self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str] | None = None
    ) -> ImageDataset:
        """A new dataset from the same source (used by the helpers below to keep the metadata)."""
        return ImageDataset(images, labels, self.source, self.class_names if class_names is None else class_names)


@dataclass(frozen=True)
class ClassSplit:
    """The BENCHMARK.md class-split protocol, ready to use.

    Label spaces (documented here once, used everywhere):
        * ``target_train``/``replay``: index into ``target_classes`` (what the target model outputs).
        * ``source_train``/``clone``: index into ``source_classes`` (what the source model outputs);
          ``clone`` holds only the clone classes K, so it is what ``pnc_surgery.clone`` takes.
        * ``test``: the combined space A then K: ``0..len(A)-1`` for A, ``len(A)+i`` for ``clone_classes[i]``.
    """

    target_classes: tuple[int, ...]
    source_classes: tuple[int, ...]
    clone_classes: tuple[int, ...]
    target_train: ImageDataset
    source_train: ImageDataset
    clone: ImageDataset
    replay: ImageDataset
    test: ImageDataset

    @property
    def num_old(self) -> int:
        """``len(A)``: the first cloned class's index in the combined label space."""
        return len(self.target_classes)

    @property
    def clone_source_ids(self) -> tuple[int, ...]:
        """The clone classes K as the source model's output indices (the ``classes=`` of ``clone``)."""
        return tuple(self.source_classes.index(k) for k in self.clone_classes)


def _resize(images: torch.Tensor, image_size: int, chunk: int = 8192) -> torch.Tensor:
    """``(N, H, W)`` raw pixels -> ``(N, 1, image_size, image_size)`` float32 (bilinear)."""
    x = images.float().unsqueeze(1)
    if x.shape[-2:] == (image_size, image_size):
        return x
    return torch.cat(
        [
            F.interpolate(x[i : i + chunk], size=(image_size, image_size), mode="bilinear", align_corners=False)
            for i in range(0, x.shape[0], chunk)
        ]
    )


def _standardized_splits(
    splits: Sequence[tuple[torch.Tensor, torch.Tensor]],
    image_size: int,
    channels: int,
    source: str,
    class_names: Sequence[str],
) -> tuple[ImageDataset, ...]:
    """Resize every split, then standardize all with the first (train) split's mean and std."""
    resized = [_resize(images, image_size) for images, _ in splits]
    mean, std = resized[0].mean(), resized[0].std()
    return tuple(
        ImageDataset(((x - mean) / std).expand(-1, channels, -1, -1).contiguous(), labels.long(), source, class_names)
        for x, (_, labels) in zip(resized, splits)
    )


def load_digits(
    image_size: int = 16, channels: int = 1, train_fraction: float = 2 / 3, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """scikit-learn's handwritten digits (1,797 images, 10 classes) as a deterministic stratified split.

    Args:
        image_size: side of the (bilinearly) resized square images; the originals are 8x8.
        channels: channels of the output images (the grey image is repeated).
        train_fraction: share of each class that goes to the train split.
        seed: seed of the split.

    Returns:
        ``(train, test)``, standardized with the train split's mean and std.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), train_size=train_fraction, stratify=bunch.target, random_state=seed
    )
    splits = [(images[idx], labels[idx]) for idx in (np.sort(train_idx), np.sort(test_idx))]
    return _standardized_splits(splits, image_size, channels, "sklearn", [str(i) for i in range(10)])  # type: ignore


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): the format of the MNIST family of datasets."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise InvalidInputError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _idx_splits(folders: Iterable[Path]) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """The first folder holding all four IDX files, and its ``{split: (images, labels)}``."""
    for folder in folders:
        paths = {split: [_find_idx(folder, stem) for stem in stems] for split, stems in _IDX_FILES.items()}
        if all(p is not None for pair in paths.values() for p in pair):
            return folder, {split: (_read_idx(img), _read_idx(lab)) for split, (img, lab) in paths.items()}
    return None


def _torchvision_splits(name: str, root: Path, download: bool) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    import torchvision.datasets  # optional dependency; imported only when the IDX files are missing

    cls = getattr(torchvision.datasets, name)
    splits = {}
    for split in ("train", "test"):
        ds = cls(str(root), train=split == "train", download=download)
        splits[split] = (ds.data.numpy(), ds.targets.numpy())
    return f"torchvision:{root}", splits


def _idx_tensors(
    name: str, folders: list[Path], root: str | Path | None, download: bool, how_to_get: str
) -> tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Where an MNIST-family dataset was found and its raw ``[(images, labels)]`` for train then test: IDX files
    first, torchvision second, a clear error last."""
    found = _idx_splits(folders)
    if found is not None:
        source, splits = str(found[0]), found[1]
    else:
        tv_root = Path(root) if root is not None else Path.home() / ".cache" / "pnc_surgery" / "datasets"
        try:
            source, splits = _torchvision_splits(name, tv_root, download)
        except Exception as exc:  # ImportError, no network, corrupt download: all end in the same advice
            looked = ", ".join(str(f) for f in folders) or "(no folder given)"
            raise FileNotFoundError(
                f"{name} not found: no IDX files (train-images-idx3-ubyte[.gz], ...) in {looked}, and torchvision "
                f"could not provide it ({type(exc).__name__}: {exc}). {how_to_get}"
            ) from exc
    logger.info("%s loaded from %s", name, source)
    return source, [
        (torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels).astype(np.int64)))
        for images, labels in (splits["train"], splits["test"])
    ]


_FASHION_HOW_TO_GET = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or `pip install torchvision` "
    "with network access, or pass root= a folder holding the four IDX files."
)


def _candidate_folders(root: str | Path | None, name: str, defaults: Sequence[Path]) -> list[Path]:
    if root is None:
        return list(defaults)
    root = Path(root)
    return [root, root / name / "raw"]  # a flat folder of IDX files, or torchvision's layout


def load_fashion_mnist(
    root: str | Path | None = None, image_size: int = 28, channels: int = 1, download: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """Fashion-MNIST (60,000 train + 10,000 test images, 10 classes).

    Looks for the IDX files in ``root`` (flat, or torchvision's ``FashionMNIST/raw``), or, without ``root``, in
    :data:`DEBIAN_FASHION_MNIST_DIR` (Debian's ``dataset-fashion-mnist``); else asks torchvision, downloading
    into ``root`` (default ``~/.cache/pnc_surgery/datasets``) when ``download``. ``dataset.source`` and the
    ``benchmarks.datasets`` logger say which was used.

    Returns:
        ``(train, test)``, standardized with the train split's mean and std.
    """
    folders = _candidate_folders(root, "FashionMNIST", [DEBIAN_FASHION_MNIST_DIR])
    source, tensors = _idx_tensors("FashionMNIST", folders, root, download, _FASHION_HOW_TO_GET)
    return _standardized_splits(tensors, image_size, channels, source, FASHION_MNIST_CLASSES)  # type: ignore[return-value]


def load_fashion_mnist_pixels(
    root: str | Path | None = None, download: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """Fashion-MNIST as the files store it: uint8 images ``(N, 28, 28)``, neither resized nor standardized.

    For pipelines that preprocess each model its own way (``timm.data.create_transform`` on
    ``PIL.Image.fromarray(image.numpy())``). Found as :func:`load_fashion_mnist` finds it.

    Returns:
        ``(train, test)``.
    """
    folders = _candidate_folders(root, "FashionMNIST", [DEBIAN_FASHION_MNIST_DIR])
    source, tensors = _idx_tensors("FashionMNIST", folders, root, download, _FASHION_HOW_TO_GET)
    return tuple(ImageDataset(images, labels, source, FASHION_MNIST_CLASSES) for images, labels in tensors)  # type: ignore[return-value]


def load_mnist(
    root: str | Path | None = None, image_size: int = 28, channels: int = 1, download: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """MNIST digits (60,000 train + 10,000 test images, 10 classes), for cross-dataset cloning.

    No Debian or PyPI package ships MNIST's images, so this reads the IDX files from ``root`` (flat, or
    torchvision's ``MNIST/raw``) when they are there, else asks torchvision (downloading when ``download``).
    ``dataset.source`` says which was used.

    Returns:
        ``(train, test)``, standardized with the train split's mean and std.
    """
    folders = _candidate_folders(root, "MNIST", [])
    how_to_get = (
        "Install torchvision and run once with network access, or pass root= a folder holding the four IDX files."
    )
    source, tensors = _idx_tensors("MNIST", folders, root, download, how_to_get)
    return _standardized_splits(tensors, image_size, channels, source, [str(i) for i in range(10)])  # type: ignore[return-value]


def tensors_of(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a dataset of ``(x, y)`` pairs, as two stacked tensors (no copy for TensorDatasets)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    pairs = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    if not pairs:
        raise InvalidInputError("empty dataset")
    return torch.stack([torch.as_tensor(x) for x, _ in pairs]), torch.as_tensor([int(y) for _, y in pairs])


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The int64 labels of a dataset of ``(x, y)`` pairs."""
    return tensors_of(dataset)[1].long()


def _rebuild(dataset: Dataset, images: torch.Tensor, labels: torch.Tensor, names: Sequence[str] | None = None):
    if isinstance(dataset, ImageDataset):
        return dataset.with_tensors(images, labels, names)
    return ImageDataset(images, labels, getattr(dataset, "source", type(dataset).__name__), names or ())


def select_classes(dataset: Dataset, classes: Sequence[int], relabel: bool = False) -> ImageDataset:
    """The examples of ``classes`` only.

    Args:
        dataset: a dataset of ``(x, y)`` pairs.
        classes: the labels to keep.
        relabel: map ``classes[i]`` to ``i`` (the label space of a model trained on these classes).
    """
    images, labels = tensors_of(dataset)
    classes = [int(c) for c in classes]
    keep = torch.isin(labels, torch.tensor(classes))
    images, labels = images[keep], labels[keep]
    names = getattr(dataset, "class_names", ())
    if relabel:
        lookup = torch.full((max(classes) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        labels = lookup[labels]
        names = tuple(names[c] for c in classes) if names else ()
    return _rebuild(dataset, images, labels, names)


def subsample(
    dataset: Dataset, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> ImageDataset:
    """A stratified random subset: ``fraction`` of each class (at least one image), or ``per_class`` images.

    The same seed gives the same subset, so every method of a benchmark sees exactly the same images.
    """
    if (fraction is None) == (per_class is None):
        raise InvalidInputError("give exactly one of fraction= and per_class=")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise InvalidInputError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise InvalidInputError(f"per_class must be >= 1, got {per_class}")
    images, labels = tensors_of(dataset)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        take = max(1, round(len(members) * fraction)) if fraction is not None else min(per_class, len(members))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    index = torch.sort(torch.cat(chosen)).values
    return _rebuild(dataset, images[index], labels[index], getattr(dataset, "class_names", None))


def take_level(dataset: Dataset, level: float | int, seed: int = 0) -> ImageDataset:
    """A data level of the benchmark: a float in (0, 1] is a fraction, an int >= 1 is images per class."""
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise InvalidInputError(f"level must be a float fraction or an int count, got {level!r}")
    if isinstance(level, float):
        return subsample(dataset, fraction=level, seed=seed)
    return subsample(dataset, per_class=level, seed=seed)


def class_split(
    train: Dataset,
    test: Dataset,
    target_classes: Sequence[int] = (0, 1, 2, 3, 4),
    source_classes: Sequence[int] = (5, 6, 7, 8, 9),
    clone_classes: Sequence[int] = (5, 6, 7),
    clone_level: float | int = 0.3,
    replay_per_class: int = 20,
    seed: int = 0,
) -> ClassSplit:
    """Build the BENCHMARK.md protocol from a 10-class train/test pair.

    Args:
        train, test: the dataset's splits (labels are the dataset's class ids).
        target_classes: A, the classes the target is trained on.
        source_classes: B, the classes the source is trained on (disjoint from A).
        clone_classes: K, a part of B.
        clone_level: how much of K's train images the clone data holds (see :func:`take_level`).
        replay_per_class: target-domain images per class of A that every method may use.
        seed: seed of the clone and replay subsamples.

    Returns:
        A :class:`ClassSplit`; its docstring gives the label space of each part.
    """
    a, b, k = (tuple(int(c) for c in cs) for cs in (target_classes, source_classes, clone_classes))
    if set(a) & set(b):
        raise InvalidInputError(f"target classes {a} and source classes {b} overlap")
    if not set(k) <= set(b) or not k:
        raise InvalidInputError(f"clone classes {k} must be a non-empty part of the source classes {b}")
    target_train = select_classes(train, a, relabel=True)
    source_train = select_classes(train, b, relabel=True)
    clone_source_ids = [b.index(c) for c in k]
    clone = take_level(select_classes(source_train, clone_source_ids), clone_level, seed=seed)
    replay = subsample(target_train, per_class=replay_per_class, seed=seed)
    test_all = select_classes(test, a + k, relabel=True)
    return ClassSplit(a, b, k, target_train, source_train, clone, replay, test_all)


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` of a batch given as a tensor, an ``(x,)``/``(x, y)`` sequence or a dict with ``pixel_values``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["pixel_values"], batch.get("labels")
    if isinstance(batch, (list, tuple)) and 1 <= len(batch) <= 2:
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise InvalidInputError(f"cannot read a batch of type {type(batch).__name__}; expected x or (x, y)")


def as_loader(
    data: Dataset | DataLoader | Iterable,
    batch_size: int = 256,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    balanced: bool = False,
) -> Iterable:
    """Batches of ``data``: a Dataset is wrapped in a DataLoader, anything else is used as is.

    Args:
        shuffle: draw the examples in a seeded random order.
        balanced: draw ``len(data)`` examples with replacement so that every class is equally likely (a
            class-balanced sampler: a few replay images then weigh as much as many new-class images).
    """
    if not (isinstance(data, Dataset) and hasattr(data, "__len__")):
        return data
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if balanced:
        labels = labels_of(data)
        weights = 1.0 / torch.bincount(labels).double()[labels]
        sampler = WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)
        shuffle = False
    return DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator, drop_last=drop_last
    )
