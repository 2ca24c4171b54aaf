"""Tests of benchmarks.datasets: offline loaders, stratified subsets, and the benchmark's class split."""

import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from benchmarks.datasets import (
    ImageDataset,
    as_loader,
    class_split,
    load_digits,
    load_fashion_mnist,
    load_fashion_mnist_pixels,
    load_mnist,
    select_classes,
    split_batch,
    subsample,
    take_level,
)
from pnc_surgery.errors import InvalidInputError


@pytest.fixture(scope="module")
def digits():
    return load_digits(image_size=12, channels=1)


def test_load_digits_shapes_and_scaling(digits):
    train, test = digits
    assert train.images.shape[1:] == (1, 12, 12) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert len(train) + len(test) == 1797 and abs(len(train) / 1797 - 2 / 3) < 0.01
    assert abs(train.images.mean().item()) < 1e-3 and abs(train.images.std().item() - 1) < 1e-3
    assert set(test.labels.tolist()) == set(range(10)) and train.source == "sklearn"


def test_load_digits_is_deterministic_and_repeats_channels():
    a, _ = load_digits(image_size=8, channels=3)
    b, _ = load_digits(image_size=8, channels=3)
    assert torch.equal(a.images, b.images) and a.images.shape[1] == 3
    assert torch.equal(a.images[:, 0], a.images[:, 2])


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_loader_reads_a_folder_and_says_so(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    train, test = load_mnist(root=tmp_path, image_size=14, download=False)
    assert train.images.shape == (30, 1, 14, 14) and len(test) == 10
    assert train.source == str(tmp_path) and train.labels.tolist()[:3] == [0, 1, 2]
    train, _ = load_fashion_mnist(root=tmp_path, download=False)
    assert train.class_names[0] == "T-shirt/top"
    pixels, _ = load_fashion_mnist_pixels(root=tmp_path, download=False)
    assert pixels.images.dtype == torch.uint8 and pixels.images.shape == (30, 28, 28)
    assert pixels.images.float().max() > 200, "raw pixels: neither resized nor standardized"


def test_missing_data_gives_advice(tmp_path):
    with pytest.raises(FileNotFoundError, match="IDX files"):
        load_mnist(root=tmp_path, download=False)


def test_select_classes_relabels(digits):
    train, _ = digits
    five_to_nine = select_classes(train, (5, 6, 7, 8, 9), relabel=True)
    assert set(five_to_nine.labels.tolist()) == set(range(5))
    assert torch.equal(five_to_nine.images, train.images[train.labels >= 5])
    kept = select_classes(train, (7,))
    assert set(kept.labels.tolist()) == {7} and isinstance(kept, ImageDataset)


def test_subsample_is_stratified_and_seeded(digits):
    train, _ = digits
    few = subsample(train, per_class=3, seed=1)
    assert torch.equal(torch.bincount(few.labels), torch.full((10,), 3))
    assert torch.equal(few.images, subsample(train, per_class=3, seed=1).images)
    assert not torch.equal(few.images, subsample(train, per_class=3, seed=2).images)
    part = subsample(train, fraction=0.5)
    assert abs(len(part) - len(train) / 2) <= 10
    with pytest.raises(InvalidInputError):
        subsample(train)
    assert len(take_level(train, 2)) == 20 and len(take_level(train, 1.0)) == len(train)


def test_subsample_accepts_plain_tensor_datasets():
    data = TensorDataset(torch.randn(20, 1, 4, 4), torch.arange(20) % 2)
    assert len(subsample(data, per_class=2)) == 4


def test_class_split_protocol(digits):
    split = class_split(*digits, clone_level=5, replay_per_class=4)
    assert split.clone_source_ids == (0, 1, 2) and split.num_old == 5
    assert torch.equal(torch.bincount(split.clone.labels), torch.full((3,), 5))
    assert torch.equal(torch.bincount(split.replay.labels), torch.full((5,), 4))
    assert set(split.target_train.labels.tolist()) == set(range(5))
    assert set(split.source_train.labels.tolist()) == set(range(5))
    assert set(split.test.labels.tolist()) == set(range(8))
    with pytest.raises(InvalidInputError):
        class_split(*digits, target_classes=(0, 5))


def test_batches_and_loaders(digits):
    train, _ = digits
    x, y = split_batch(next(iter(as_loader(train, batch_size=7))))
    assert x.shape[0] == 7 and y.shape == (7,)
    assert split_batch(x)[1] is None and split_batch({"pixel_values": x})[0] is x


def test_balanced_loader_evens_out_classes():
    data = TensorDataset(torch.zeros(110, 1), torch.tensor([0] * 100 + [1] * 10))
    labels = torch.cat([y for _, y in as_loader(data, batch_size=55, balanced=True, seed=0)])
    assert len(labels) == 110 and 35 < int((labels == 1).sum()) < 75
