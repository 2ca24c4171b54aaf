"""Specification of how each model gets its own inputs (issue 15, item 1): the clone data is in the target's format,
and the source is fed *its* format, never the target's pixels as they are.

* When both models record their normalisation (timm's data config) and the two differ, the source sees the pixels
  normalised again with its own statistics; with the same statistics it sees the data unchanged.
* What a model records is its pretrained preprocessing, not necessarily what it was trained on since: when the
  source answers the labelled clone data clearly better as given than renormalised, it is fed them as given, and a
  warning says so.
* ``source_transform=`` replaces that mapping; one that fails, or gives inputs the source cannot take, is refused
  before any training.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pnc_surgery import CloneConfig, InvalidInputError, clone
from pnc_surgery.backends.timm import TimmBackend, create_model
from pnc_surgery.data import Examples, source_transform

TINY = CloneConfig(max_cuts=1, max_insertions=1, search_steps=2, train_steps=4, localize=False, gate="energy")


def _model(num_classes: int, seed: int, mean: float | None = None, std: float | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("resnet18", num_classes=num_classes, in_chans=1, channels=(8, 8, 16, 16)).eval()
    if mean is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": (mean,) * 3, "std": (std,) * 3}
    return model


def _constant_data(value: float, count: int = 8) -> list[tuple[torch.Tensor, int]]:
    return [(torch.full((1, 16, 16), value), i % 2) for i in range(count)]


def _source_inputs(source: torch.nn.Module) -> list[torch.Tensor]:
    """Record what the source's stem receives during a clone."""
    seen: list[torch.Tensor] = []
    source.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def test_a_source_with_other_statistics_gets_its_own_normalisation():
    target = _model(5, 1, mean=0.2, std=0.1)
    source = _model(4, 0, mean=0.5, std=0.25)
    seen = _source_inputs(source)
    clone(source, target, _constant_data(3.0), config=TINY, progress=False)  # pixel 0.2 + 3.0 * 0.1 = 0.5
    assert any(torch.allclose(x, torch.zeros_like(x), atol=1e-5) for x in seen if x.shape[0] == 8), (
        "the source must see (0.5 - 0.5) / 0.25 = 0, not the target's 3.0"
    )
    batches = [x for x in seen if x.shape[0] == 8]  # the whole data (input checks use two examples)
    as_given = [x for x in batches if torch.allclose(x, torch.full_like(x, 3.0))]
    assert len(as_given) <= 1, "beyond the one check of the data as given, the target's pixels reached the source"


def test_models_with_the_same_statistics_share_the_data_unchanged():
    backend = TimmBackend()
    source, target = _model(4, 0), _model(5, 1)
    sample = torch.randn(2, 1, 16, 16)
    assert source_transform(source, backend, sample, backend.normalization(target)) is None


class BrightnessClassifier(torch.nn.Module):
    """Class 1 where an image's mean pixel is above ``threshold``, else class 0; records a timm data config."""

    def __init__(self, threshold: float, mean: float, std: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.pretrained_cfg = {"input_size": (1, 8, 8), "mean": (mean,), "std": (std,)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.mean(dim=(1, 2, 3)) - self.threshold
        return torch.stack([-score, score], dim=1)


def _brightness_data() -> Examples:
    """Images at 1.0 (class 1) and 0.8 (class 0), in the target's format (normalised with mean 0, std 1)."""
    images = torch.cat([torch.full((6, 1, 8, 8), 1.0), torch.full((6, 1, 8, 8), 0.8)])
    return Examples(images, torch.tensor([1] * 6 + [0] * 6))


def test_a_source_trained_on_the_data_as_given_gets_it_as_given_whatever_its_data_config_says(caplog):
    source = BrightnessClassifier(threshold=0.9, mean=0.0, std=0.01)  # renormalised, both classes are above 80
    data = _brightness_data()
    with caplog.at_level(logging.WARNING, logger="pnc_surgery.data"):
        transform = source_transform(source, TimmBackend(), data.inputs[:2], ((0.0,), (1.0,)), labelled=data)
    assert transform is None
    assert "as given" in caplog.text


def test_a_source_that_answers_right_renormalised_stays_renormalised():
    source = BrightnessClassifier(threshold=0.0, mean=0.9, std=0.05)  # (1.0 - 0.9) / 0.05 = 2, (0.8 - 0.9) / 0.05 = -2
    data = _brightness_data()
    transform = source_transform(source, TimmBackend(), data.inputs[:2], ((0.0,), (1.0,)), labelled=data)
    assert transform is not None
    assert torch.allclose(transform(data.inputs[:1]), torch.full((1, 1, 8, 8), 2.0))


def test_a_source_transform_replaces_the_automatic_mapping():
    source, target = _model(4, 0, mean=0.5, std=0.25), _model(5, 1, mean=0.2, std=0.1)
    seen = _source_inputs(source)
    clone(source, target, _constant_data(3.0), config=TINY, progress=False, source_transform=lambda x: x * 0 + 7.0)
    assert any(torch.allclose(x, torch.full_like(x, 7.0)) for x in seen if x.shape[0] == 8)


@pytest.mark.parametrize(
    "transform, message",
    [
        (lambda x: x[:, :, :0], "cannot run"),
        (lambda x: 1 / 0, "ZeroDivisionError"),
        ("resize", "callable"),
    ],
)
def test_a_source_transform_that_does_not_work_is_refused(transform, message):
    with pytest.raises(InvalidInputError, match=message):
        clone(_model(4, 0), _model(5, 1), _constant_data(1.0), config=TINY, progress=False, source_transform=transform)


# Raw data: PIL images, image paths, an image folder, ``datasets``-like rows and strings, each model preprocessed in
# its own format (timm: its data config's eval transform; transformers: its processor or tokenizer).

GREY = 128
"""Every test image is this uniform grey, so each model's normalisation shows in what its stem receives."""


def _rgb_model(num_classes: int, seed: int, mean: float, std: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("resnet18", num_classes=num_classes, channels=(8, 8, 16, 16)).eval()
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "mean": (mean,) * 3,
        "std": (std,) * 3,
    }
    return model


def _images(count: int = 8) -> list:
    from PIL import Image

    return [Image.new("RGB", (40, 24), (GREY, GREY, GREY)) for _ in range(count)]


def _stems(source: torch.nn.Module, target: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return _source_inputs(source), _source_inputs(target)


def _assert_each_model_got_its_own_pixels(source_seen: list[torch.Tensor], target_seen: list[torch.Tensor]) -> None:
    """Among the batches of all 8 examples, each model saw the grey normalised with its own statistics, never with
    the other's."""
    pixel = GREY / 255
    source_value, target_value = (pixel - 0.5) / 0.25, (pixel - 0.2) / 0.1
    for seen, own, other, who in (
        (source_seen, source_value, target_value, "source"),
        (target_seen, target_value, source_value, "target"),
    ):
        batches = [x for x in seen if x.shape[0] == 8]
        assert batches, f"the {who} never saw the clone data"
        assert all(x.shape[-2:] == (32, 32) for x in batches), f"the {who} must get its data config's size"
        assert any(torch.allclose(x, torch.full_like(x, own), atol=1e-3) for x in batches), (
            f"the {who} must see the pixels normalised with its own mean/std ({own:.3f})"
        )
        assert not any(torch.allclose(x, torch.full_like(x, other), atol=1e-3) for x in batches), (
            f"the {who} saw pixels normalised for the other model ({other:.3f})"
        )


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return _rgb_model(4, 0, mean=0.5, std=0.25), _rgb_model(5, 1, mean=0.2, std=0.1)


def test_pil_images_are_preprocessed_for_each_model_in_its_own_format():
    source, target = _models()
    seen = _stems(source, target)
    clone(source, target, [(image, i % 2) for i, image in enumerate(_images())], config=TINY, progress=False)
    _assert_each_model_got_its_own_pixels(*seen)


def test_an_image_folder_gives_labels_by_sub_folder_name(tmp_path):
    for i, image in enumerate(_images()):
        folder = tmp_path / str(i % 2)
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not a class")
    source, target = _models()
    seen = _stems(source, target)
    clone(source, target, tmp_path, config=TINY, progress=False)
    _assert_each_model_got_its_own_pixels(*seen)


def test_an_image_folder_of_label_names_maps_names_to_source_classes(tmp_path):
    from pnc_surgery.preprocess import encode

    source, target = _models()
    source.pretrained_cfg = {**source.pretrained_cfg, "label_names": ["ant", "bee", "cat", "dog"]}
    paths = []
    for i, image in enumerate(_images(4)):
        folder = tmp_path / ("bee" if i % 2 else "dog")
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{i}.png")
        paths.append((folder / f"{i}.png", 1 if i % 2 else 3))
    from_folder = encode(tmp_path, target, source, names=["ant", "bee", "cat", "dog"])
    from_paths = encode([(str(path), label) for path, label in paths], target, source)
    assert sorted(from_folder.labels.tolist()) == sorted(from_paths.labels.tolist()) == [1, 1, 3, 3]
    assert from_folder.source is not None and from_folder.source.shape == (4, 3, 32, 32)


def test_datasets_rows_are_read_through_configurable_columns():
    rows = [{"picture": image, "class": i % 2, "other": "x"} for i, image in enumerate(_images())]
    source, target = _models()
    seen = _stems(source, target)
    replay = [{"picture": image} for image in _images(4)]
    clone(
        source, target, rows, replay=replay, config=TINY, progress=False, image_column="picture", label_column="class"
    )
    _assert_each_model_got_its_own_pixels(*seen)


def test_rows_without_the_named_columns_are_refused():
    rows = [{"img": image, "label": i % 2} for i, image in enumerate(_images())]
    with pytest.raises(InvalidInputError, match="image_column"):
        clone(*_models(), rows, config=TINY, progress=False)


def test_raw_data_with_a_source_transform_is_refused():
    data = [(image, i % 2) for i, image in enumerate(_images())]
    with pytest.raises(InvalidInputError, match="source_processor"):
        clone(*_models(), data, config=TINY, progress=False, source_transform=lambda x: x)


def _tiny_vit() -> torch.nn.Module:
    """A 3-class transformers ViT on 32 px RGB images, built without a name or a processor."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def test_a_transformers_model_without_name_or_processor_asks_for_the_processor():
    target = _tiny_vit()
    data = [(image, i % 2) for i, image in enumerate(_images())]
    with pytest.raises(InvalidInputError, match="target_processor"):
        clone(_models()[0], target, data, config=TINY, progress=False)


def test_a_transformers_image_processor_feeds_its_model():
    from transformers import ViTImageProcessor

    torch.manual_seed(1)
    target = _tiny_vit()
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2] * 3, image_std=[0.1] * 3)
    source = _models()[0]
    seen = _source_inputs(source), []
    target.vit.embeddings.patch_embeddings.projection.register_forward_pre_hook(
        lambda module, args: seen[1].append(args[0].detach().clone())
    )
    data = [(image, i % 2) for i, image in enumerate(_images())]
    clone(source, target, data, config=TINY, progress=False, target_processor=processor)
    _assert_each_model_got_its_own_pixels(*seen)


WORDS = ["[PAD]", "[UNK]", "ant", "bee", "cat", "dog", "eel", "fox"]


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def test_raw_strings_are_tokenized_for_each_model_with_its_own_tokenizer():
    from transformers import BertConfig, BertForSequenceClassification

    def bert(num_labels: int) -> torch.nn.Module:
        return BertForSequenceClassification(
            BertConfig(
                vocab_size=len(WORDS),
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=16,
                num_labels=num_labels,
            )
        ).eval()

    torch.manual_seed(0)
    source, target = bert(4), bert(3)
    reordered = WORDS[:2] + WORDS[:1:-1]  # the target's ids of the same words, in the other order
    seen: dict[str, list[torch.Tensor]] = {"source": [], "target": []}
    for name, model in (("source", source), ("target", target)):
        model.bert.embeddings.word_embeddings.register_forward_pre_hook(
            lambda module, args, name=name: seen[name].append(args[0].detach().clone())
        )
    data = [("ant bee", 0), ("ant", 0), ("ant bee cat", 0), ("fox eel dog", 1), ("fox", 1), ("fox eel", 1)]
    clone(
        source,
        target,
        data,
        config=TINY,
        progress=False,
        source_processor=_tokenizer(WORDS),
        target_processor=_tokenizer(reordered),
    )
    first_word = {name: next(x for x in ids if x.shape[0] == 6)[:, 0].tolist() for name, ids in seen.items()}
    assert first_word["source"] == [WORDS.index(w) for w in ("ant", "ant", "ant", "fox", "fox", "fox")]
    assert first_word["target"] == [reordered.index(w) for w in ("ant", "ant", "ant", "fox", "fox", "fox")]


def test_a_source_processor_whose_output_the_source_cannot_take_is_refused():
    def broken(images, return_tensors):
        return {"pixel_values": torch.zeros(len(images), 3, 0, 0)}

    data = [(image, i % 2) for i, image in enumerate(_images())]
    with pytest.raises(InvalidInputError, match=r"source .*cannot run"):
        clone(*_models(), data, config=TINY, progress=False, source_processor=broken)
