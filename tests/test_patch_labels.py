"""Label names of a patched model: transformers pipelines name the cloned classes, detach restores the config, and
``patch.labels(target)`` names a timm target's outputs. Models and processors are built locally, offline.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_patch import SEQ, VOCAB, make_case

from pnc_surgery import Patch

ANIMALS = ["cat", "dog", "cow", "pig", "hen", "fox", "elk"]


def copy_of_case(name: str, class_names: tuple[str, ...] | None = None) -> tuple[torch.nn.Module, Patch]:
    """A copy of ``test_patch``'s case ``name``: target labelled with ANIMALS, patch naming ``class_names``."""
    case = make_case(name)
    target, patch = copy.deepcopy(case.target), copy.deepcopy(case.patch)
    if hasattr(target, "config"):
        target.config.id2label = dict(enumerate(ANIMALS))
        target.config.label2id = {label: i for i, label in enumerate(ANIMALS)}
    if class_names is not None:
        patch.update_config(class_names=class_names)
    return target, patch


@pytest.fixture(scope="module")
def vit_pair() -> tuple[torch.nn.Module, Patch]:
    """A transformers ViT target with animal labels and a patch whose first name collides with one of them."""
    return copy_of_case("hf_vit", ("cat", "owl"))


def pil_images(count: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    arrays = torch.randint(0, 256, (count, 32, 32, 3), generator=g, dtype=torch.uint8)
    return [Image.fromarray(a.numpy()) for a in arrays]


def test_attach_names_the_cloned_classes_in_the_config_and_detach_restores_it_exactly(vit_pair) -> None:
    target, patch = vit_pair
    before = copy.deepcopy(target.config.to_dict())
    id2label, label2id = target.config.id2label, target.config.label2id
    with patch.attached(target):
        assert target.config.num_labels == 9
        assert [target.config.id2label[i] for i in range(7, 9)] == ["cat (2)", "owl"]
        assert target.config.label2id["owl"] == 8
        assert patch.labels(target) == [*ANIMALS, "cat (2)", "owl"]
    assert target.config.to_dict() == before
    assert target.config.id2label is id2label and target.config.label2id is label2id  # the very objects


def test_image_classification_pipeline_returns_the_new_names(vit_pair) -> None:
    from transformers import ViTImageProcessor, pipeline

    target, patch = vit_pair
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    classify = pipeline("image-classification", model=target, image_processor=processor, device="cpu")
    with patch.attached(target):
        results = classify(pil_images(2), top_k=20)
        with torch.no_grad():
            logits = target(**processor(pil_images(2), return_tensors="pt")).logits
    for result, row in zip(results, logits, strict=True):
        assert {r["label"] for r in result} == {*ANIMALS, "cat (2)", "owl"}  # top-k over old and new classes
        assert result[0]["label"] == [*ANIMALS, "cat (2)", "owl"][int(row.argmax())]
    assert {r["label"] for r in classify(pil_images(1)[0], top_k=20)} == set(ANIMALS)  # detached: the old model


def test_text_classification_pipeline_returns_the_new_names(tmp_path: Path) -> None:
    from transformers import BertTokenizer, pipeline

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(VOCAB - 5))]))
    tokenizer = BertTokenizer(vocab_file=str(vocab), model_max_length=SEQ)
    target, patch = copy_of_case("hf_bert", ("owl", "bee"))
    classify = pipeline("text-classification", model=target, tokenizer=tokenizer, device="cpu")
    before = copy.deepcopy(target.config.to_dict())
    with patch.attached(target):
        result = classify("w1 w2 w3 w4", top_k=None)
    assert {r["label"] for r in result} == {*ANIMALS, "owl", "bee"}
    assert abs(sum(r["score"] for r in result) - 1) < 1e-5
    assert target.config.to_dict() == before


def test_stacked_patches_name_their_classes_in_attach_order_and_detach_in_any_order(vit_pair) -> None:
    target, patch = vit_pair
    other = copy.deepcopy(patch)  # a second patch: the first under other names
    other.update_config(class_names=("eel", "ant"))
    patch.attach(target)
    other.attach(target)
    assert [target.config.id2label[i] for i in range(7, 11)] == ["cat (2)", "owl", "eel", "ant"]
    patch.detach()
    assert [target.config.id2label[i] for i in range(7, 9)] == ["eel", "ant"] and target.config.num_labels == 9
    other.detach()
    assert target.config.id2label == dict(enumerate(ANIMALS))


def test_timm_labels_come_from_the_pretrained_config_where_it_has_them() -> None:
    target, patch = copy_of_case("timm_cnn")
    assert patch.labels(target) == [f"class_{i}" for i in range(7)] + ["class_1 (2)", "class_3 (2)"]
    target.pretrained_cfg = {**target.pretrained_cfg, "label_names": ANIMALS}
    assert patch.labels(target) == [*ANIMALS, "class_1", "class_3"]
