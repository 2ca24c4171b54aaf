"""``pnc_surgery.clone`` on transformers sequence classifiers: padded token data, a BERT source, a DistilBERT target."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import tiny_bart

from pnc_surgery import CloneConfig, Patch, clone

VOCAB, LENGTH, MARKERS = 64, 12, 10
"""Sentence ``i`` of class ``c`` holds marker token ``10 + c`` three times among filler tokens, then padding."""


def sentences(classes: list[int], per_class: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    ids = torch.randint(MARKERS + 10, VOCAB, (len(labels), LENGTH), generator=gen)
    mask = torch.ones_like(ids)
    for row, label in enumerate(labels.tolist()):
        real = int(torch.randint(6, LENGTH + 1, (), generator=gen))
        ids[row, torch.randperm(real, generator=gen)[:3]] = MARKERS + label
        ids[row, real:], mask[row, real:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}, labels


def train(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, steps: int = 150) -> nn.Module:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(labels), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(**{k: v[batch] for k, v in inputs.items()}).logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def as_pairs(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> list[tuple[dict[str, torch.Tensor], int]]:
    return [({k: v[i] for k, v in inputs.items()}, int(labels[i])) for i in range(len(labels))]


@pytest.fixture(scope="module")
def models():
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    torch.manual_seed(0)
    source = BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=5,
        )
    )
    target = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=32,
            num_labels=5,
        )
    )
    train(source, *sentences([0, 1, 2, 3, 4], 60, seed=1))  # the source's classes 0-4 are markers 0-4
    target_inputs, target_labels = sentences([5, 6, 7, 8, 9], 60, seed=2)
    train(target, target_inputs, target_labels - 5)  # the target's classes 0-4 are markers 5-9
    return source, target


def test_a_sequence_classifier_gains_classes_from_another_architecture(models):
    source, target = models
    clone_inputs, clone_labels = sentences([0, 1, 2], 40, seed=3)
    replay_inputs, _ = sentences([5, 6, 7, 8, 9], 20, seed=4)
    replay = [{k: v[i] for k, v in replay_inputs.items()} for i in range(len(replay_inputs["input_ids"]))]
    config = CloneConfig(max_cuts=2, max_insertions=2, search_steps=10, train_steps=100)
    patch = clone(source, target, as_pairs(clone_inputs, clone_labels), replay=replay, config=config, progress=False)
    assert patch.metrics["gate"] in ("novelty", "learned"), "unlabelled replay data still gives a discriminant gate"
    assert "with their shifted copies" in patch.metrics["locality_protection"], "copies each missing one token"

    test_new, new_labels = sentences([0, 1, 2], 30, seed=5)
    test_old, _ = sentences([5, 6, 7, 8, 9], 30, seed=6)
    with torch.no_grad():
        original = target(**test_old).logits
        with patch.attached(target):
            patched_old = target(**test_old).logits
            patched_new = target(**test_new).logits
        restored = target(**test_old).logits
    assert patched_new.shape == (90, 8)
    assert torch.equal(patched_old[:, :5], original) and torch.equal(restored, original)
    assert (patched_new.argmax(-1) == new_labels + 5).float().mean() >= 0.8
    assert (patched_old.argmax(-1) == original.argmax(-1)).float().mean() >= 0.95


def test_a_decoder_that_pools_the_last_non_pad_token_is_a_source(models, tmp_path):
    """GPT-2 finds the token it classifies from the ids (the last non-pad one): its branch must pool that position
    of a padded batch, not the first, or the cloned classes are noise."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    _, target = models
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=5, pad_token_id=0)
    source = train(GPT2ForSequenceClassification(config), *sentences([0, 1, 2, 3, 4], 60, seed=1))
    clone_inputs, clone_labels = sentences([0, 1, 2], 40, seed=3)
    config = CloneConfig(max_cuts=2, max_insertions=2, search_steps=10, train_steps=100)
    patch = clone(source, target, as_pairs(clone_inputs, clone_labels), config=config, progress=False)

    test_new, new_labels = sentences([0, 1, 2], 30, seed=5)
    assert (test_new["attention_mask"] == 0).any(), "the test batch is padded"
    with torch.no_grad(), patch.attached(target):
        patched_new = target(**test_new).logits
    assert (patched_new[:, 5:].argmax(-1) == new_labels).float().mean() >= 0.8, "chance is 1/3"
    patch.save_pretrained(tmp_path / "patch")
    with torch.no_grad(), Patch.from_pretrained(tmp_path / "patch").attached(target):
        assert torch.allclose(target(**test_new).logits, patched_new, atol=1e-5), "the pad and eos ids are saved"


def ending_in_eos(inputs: dict[str, torch.Tensor], eos: int = 1) -> dict[str, torch.Tensor]:
    """The same sentences with an eos id as each one's last real token, as a BART tokenizer ends them."""
    ids = inputs["input_ids"].clone()
    ids[torch.arange(len(ids)), inputs["attention_mask"].sum(1) - 1] = eos
    return {**inputs, "input_ids": ids}


@pytest.mark.parametrize(
    ("cut", "decoder_layers"),
    [("model.encoder.layers.1", 1), ("model.decoder.layers.0", 2)],
    ids=["encoder", "decoder"],
)
def test_an_encoder_decoder_source_is_cut_and_its_branch_reads_the_token_ids(models, tmp_path, cut, decoder_layers):
    """BART's decoder embeds the token ids itself: a branch cut in the encoder gets them from the patched call; one
    cut in the decoder also computes the encoder from them (the decoder's later layers read its output)."""
    from pnc_surgery.errors import PatchMismatchError

    _, target = models
    source_inputs, source_labels = sentences([0, 1, 2, 3, 4], 60, seed=1)
    bart = tiny_bart(VOCAB, num_labels=5, decoder_layers=decoder_layers)
    source = train(bart, ending_in_eos(source_inputs), source_labels)
    clone_inputs, clone_labels = sentences([0, 1, 2], 40, seed=3)
    config = CloneConfig(cut=cut, max_insertions=2, search_steps=10, train_steps=100)
    patch = clone(source, target, as_pairs(ending_in_eos(clone_inputs), clone_labels), config=config, progress=False)
    assert patch.metrics["cut"] == cut and patch.branch.reads_input
    encoder_weights = patch.branch.model.model.encoder.layers[0].fc1.weight.numel()
    assert (encoder_weights > 0) == cut.startswith("model.decoder"), "only a decoder cut keeps the encoder"

    test_new, new_labels = sentences([0, 1, 2], 30, seed=5)
    test_new = ending_in_eos(test_new)
    with torch.no_grad():
        original = target(**test_new).logits
        with patch.attached(target):
            patched_new = target(**test_new).logits
            with pytest.raises(PatchMismatchError, match="reads the token ids"):
                target(inputs_embeds=target.get_input_embeddings()(test_new["input_ids"]))
        assert torch.equal(target(**test_new).logits, original)
    assert (patched_new[:, 5:].argmax(-1) == new_labels).float().mean() >= 0.8, "chance is 1/3"
    patch.save_pretrained(tmp_path / "patch")
    with torch.no_grad(), Patch.from_pretrained(tmp_path / "patch").attached(target):
        assert torch.allclose(target(**test_new).logits, patched_new, atol=1e-5), "the loaded branch reads the ids"
