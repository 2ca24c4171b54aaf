"""Tests of benchmarks.training: the shared training loop, prediction and logits extraction."""

import pytest
import timm
import torch
from torch import nn

from benchmarks.datasets import class_split, load_digits, select_classes
from benchmarks.training import accuracy, logits_of, predict_logits, train_classifier
from pnc_surgery.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def split():
    return class_split(*load_digits(image_size=16), clone_level=10)


def _tiny_resnet(num_classes: int) -> nn.Module:
    return timm.create_model(
        "resnet18", pretrained=False, num_classes=num_classes, in_chans=1, channels=(8, 16, 32, 64)
    )


def test_train_classifier_learns_digits_and_returns_eval(split):
    model = train_classifier(_tiny_resnet(5), split.target_train, epochs=8, progress=False)
    assert not model.training
    test_old = select_classes(split.test, range(5))
    assert accuracy(model, test_old) > 0.8


def test_training_is_seeded_and_leaves_global_rng(split):
    model = _tiny_resnet(5)
    state = torch.random.get_rng_state()
    train_classifier(model, split.replay, epochs=1, seed=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(0)
    b = _tiny_resnet(5)
    torch.manual_seed(0)
    c = _tiny_resnet(5)
    for model in (b, c):
        train_classifier(model, split.replay, epochs=1, seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), c.parameters()))


def test_label_map_and_extra_loss(split):
    model = _tiny_resnet(3)
    calls = []

    def extra(x, logits):
        calls.append(x.shape[0])
        return logits.pow(2).mean() * 0.0

    train_classifier(model, split.clone, epochs=1, progress=False, label_map={0: 2, 1: 1, 2: 0}, extra_loss=extra)
    assert calls


def test_only_trainable_parameters_change(split):
    model = _tiny_resnet(5)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("fc.")}
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("fc."))
    train_classifier(model, split.replay, epochs=1, progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_logits_of_reads_every_output_kind():
    t = torch.randn(2, 3)
    from transformers.modeling_outputs import ImageClassifierOutput

    assert logits_of(t) is t
    assert logits_of(ImageClassifierOutput(logits=t)) is t
    assert logits_of({"logits": t}) is t and logits_of((t, None)) is t
    with pytest.raises(UnsupportedModelError):
        logits_of("nope")


def test_predict_logits_restores_mode(split):
    model = _tiny_resnet(5).train()
    logits = predict_logits(model, split.replay, batch_size=32)
    assert logits.shape == (len(split.replay), 5) and model.training


def test_steps_budget_cycles_small_data(split):
    seen = []
    train_classifier(
        _tiny_resnet(5),
        split.replay,
        steps=7,
        batch_size=32,
        progress=False,
        extra_loss=lambda x, logits: seen.append(1) or logits.sum() * 0.0,
    )
    assert len(seen) == 7
