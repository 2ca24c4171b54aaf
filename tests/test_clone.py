"""Specification of ``pnc_surgery.clone``: the method end to end on scikit-learn's digits, and its refusals."""

from __future__ import annotations

import dataclasses
import importlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

import pnc_surgery
from benchmarks.datasets import class_split, load_digits
from benchmarks.training import predict_logits, train_classifier
from pnc_surgery import CloneConfig, InvalidInputError, clone
from pnc_surgery.backends.timm import create_model
from pnc_surgery.clone import BUDGETS
from pnc_surgery.demo import DEMO_CLONE_CONFIG, parameter_digest

FAST = DEMO_CLONE_CONFIG
clone_module = importlib.import_module("pnc_surgery.clone")  # the module, which the package's ``clone`` shadows


def small_resnet(num_classes: int) -> torch.nn.Module:
    return create_model("resnet18", num_classes=num_classes, in_chans=1, channels=(16, 32, 64, 128))


@pytest.fixture(scope="module")
def digits():
    """Target trained on digits 0-4, source on 5-9 (source ids 0-4), the BENCHMARK protocol at 30% clone data."""
    torch.manual_seed(0)
    train, test = load_digits(image_size=16)
    split = class_split(train, test, clone_level=0.3, replay_per_class=20, seed=0)
    target, source = small_resnet(5), small_resnet(5)
    train_classifier(target, split.target_train, epochs=8, seed=0, progress=False)
    train_classifier(source, split.source_train, epochs=8, seed=1, progress=False)
    return split, target, source


def _clone_digits(digits):
    """The cloned classes of the digits fixture, with its replay set, the fast config and seed 0."""
    split, target, source = digits
    return clone(
        source,
        target,
        split.clone,
        classes=split.clone_source_ids,
        replay=split.replay,
        config=FAST,
        seed=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def cloned(digits):
    split, target, _ = digits
    before = parameter_digest(target)
    original = predict_logits(target, split.test)
    return _clone_digits(digits), before, original


def test_clone_adds_the_cloned_classes_and_keeps_the_targets_answers(digits, cloned):
    split, target, source = digits
    patch, before, original = cloned
    with patch.attached(target):
        patched = predict_logits(target, split.test)
    labels = split.test.tensors[1]
    old = labels < split.num_old
    prediction = patched.argmax(-1)
    assert patched.shape[1] == 5 + 3
    assert torch.equal(patched[:, :5], original), "the target's own logits must be untouched"
    source_logits = predict_logits(source, TensorDataset(split.test.tensors[0][~old], labels[~old]))
    source_accuracy = (source_logits[:, [0, 1, 2]].argmax(-1) == labels[~old] - 5).float().mean().item()
    acc_new = (prediction[~old] == labels[~old]).float().mean().item()
    acc_old = (prediction[old] == labels[old]).float().mean().item()
    locality = (prediction[old] == original[old].argmax(-1)).float().mean().item()
    assert acc_new >= source_accuracy - 0.3, (acc_new, source_accuracy)
    assert acc_old >= (original[old].argmax(-1) == labels[old]).float().mean().item() - 0.03
    assert locality >= 0.97
    assert parameter_digest(target) == before, "not one target parameter or buffer may change"
    assert torch.equal(predict_logits(target, split.test), original), "detach gives back the exact original"


def test_clone_records_what_it_measured(cloned):
    patch = cloned[0]
    for key in (
        "source_local_accuracy",
        "heldout_local_accuracy",
        "kept_ratio",
        "cut",
        "insertion",
        "clone_seconds",
        "locality_protection",
    ):
        assert key in patch.metrics, key
    assert patch.config.search, "the (cut, insertion) ranking is recorded"
    assert patch.config.search[0]["cut"] == patch.metrics["cut"]
    checked = patch.metrics["gate_check"]  # one finalist per insertion point, each with its trial gate's pass rate
    assert len({row["insertion"] for row in checked}) == len(checked) >= 2
    assert all(0 <= row["gate_pass_rate"] <= 1 for row in checked)
    assert (patch.metrics["cut"], patch.metrics["insertion"]) in {(row["cut"], row["insertion"]) for row in checked}
    assert patch.class_ids == [0, 1, 2]
    assert "replay" in patch.metrics["locality_protection"]


def test_localization_makes_the_branch_and_the_file_smaller(digits, cloned, tmp_path):
    _, _, source = digits
    patch = cloned[0]
    assert patch.metrics["branch_parameters"] < patch.metrics["unpruned_branch_parameters"]
    patch.save(tmp_path / "patch.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "source.safetensors"))
    assert (tmp_path / "patch.safetensors").stat().st_size < (tmp_path / "source.safetensors").stat().st_size


def test_a_saved_clone_reloads_and_answers_the_same(digits, cloned, tmp_path):
    split, target, _ = digits
    patch = cloned[0]
    with patch.attached(target):
        expected = predict_logits(target, split.test)
    reloaded = pnc_surgery.Patch.from_pretrained(patch.save_pretrained(tmp_path / "patch"))
    with reloaded.attached(target):
        assert torch.equal(predict_logits(target, split.test), expected)


def test_clone_is_reproducible_with_a_seed(digits):
    split, target, source = digits
    tiny = CloneConfig(max_cuts=1, max_insertions=1, train_steps=20, keep_ratio=0.5)
    first = clone(source, target, split.clone, classes=[0], config=tiny, seed=3, progress=False).tensors()
    second = clone(source, target, split.clone, classes=[0], config=tiny, seed=3, progress=False).tensors()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_clone_works_on_at_most_images_per_class_examples_of_each_class(digits, monkeypatch):
    """Past ``images_per_class`` more data only costs time: every stage sees a seeded sample of each class."""
    split, target, source = digits
    seen = []
    extract = clone_module._extract

    def counting(model, names, examples, *args, **kwargs):
        seen.append(torch.bincount(examples.labels).tolist())
        return extract(model, names, examples, *args, **kwargs)

    monkeypatch.setattr(clone_module, "_extract", counting)
    config = CloneConfig(max_cuts=1, max_insertions=1, train_steps=2, keep_ratio=0.5, images_per_class=10)
    patch = clone(source, target, split.clone, classes=[0, 1, 2], config=config, progress=False)
    assert patch.metrics["clone_examples"] == len(split.clone) > 30
    assert patch.metrics["clone_examples_used"] == 30
    assert seen == [[10, 10, 10], [10, 10, 10]], "the target's and the source's features of the kept examples"
    again = clone(source, target, split.clone, classes=[0, 1, 2], config=config, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(patch.tensors().values(), again.tensors().values()))


def test_a_branch_budget_keeps_the_pruned_branch_within_its_share_of_the_source(digits):
    split, target, source = digits
    config = CloneConfig(max_cuts=1, max_insertions=1, search_steps=2, train_steps=2, max_branch_share=0.05)
    patch = clone(source, target, split.clone, classes=[0, 1, 2], config=config, progress=False)
    metrics, source_parameters = patch.metrics, sum(p.numel() for p in source.parameters())
    assert metrics["branch_parameters"] <= 0.05 * source_parameters < metrics["unpruned_branch_parameters"]
    assert metrics["prune_keep_ratio"] <= min(metrics["tolerated_keep_ratios"])


@pytest.mark.parametrize("examples_needed", [1, 10_000])
def test_the_auto_branch_budget_applies_only_to_a_large_enough_clone_set(digits, monkeypatch, examples_needed):
    split, target, source = digits
    monkeypatch.setattr(clone_module, "AUTO_BUDGET_EXAMPLES", examples_needed)
    config = CloneConfig(max_cuts=1, max_insertions=1, search_steps=2, train_steps=2)
    metrics = clone(source, target, split.clone, classes=[0, 1, 2], config=config, progress=False).metrics
    if examples_needed == 1:
        assert metrics["max_branch_share"] == clone_module.AUTO_BRANCH_SHARE
        assert "tolerated_keep_ratios" in metrics
    else:
        assert metrics["max_branch_share"] is None and "tolerated_keep_ratios" not in metrics


def test_the_budgets_train_in_passes_over_small_sets_and_at_most_a_fine_tunes_steps_on_large_ones():
    default = BUDGETS["default"]
    assert default.train_steps(290, 64) == 136, "30 passes over 290 examples, rounded up"
    assert default.train_steps(100_000, 64) == 150
    assert default.search_steps(290, 64) == 10 and default.search_steps(100_000, 64) == 16
    assert BUDGETS["thorough"].train_steps(100_000, 64) == 156_250, "thorough has no cap"
    assert BUDGETS["fast"].images_per_class < default.images_per_class and BUDGETS["thorough"].images_per_class is None


def test_the_default_budget_keeps_every_example_of_a_small_clone_set(cloned):
    assert cloned[0].metrics["clone_examples_used"] == cloned[0].metrics["clone_examples"]


def test_without_replay_the_gate_says_how_locality_was_protected(digits):
    split, target, source = digits
    tiny = CloneConfig(max_cuts=1, max_insertions=1, train_steps=20)
    patch = clone(source, target, split.clone, config=tiny, progress=False)
    assert patch.metrics["gate"] == "energy"
    assert "no replay" in patch.metrics["locality_protection"]


@pytest.mark.parametrize(
    "make_source",
    [
        lambda: create_model(
            "vit_tiny_patch16_224",
            num_classes=5,
            in_chans=1,
            img_size=16,
            patch_size=4,
            embed_dim=32,
            depth=2,
            num_heads=2,
        ),
        lambda: _tiny_hf_vit(),
    ],
    ids=["timm-vit-into-timm-resnet", "transformers-vit-into-timm-resnet"],
)
def test_a_heterogeneous_pair_clones_and_attaches(digits, make_source):
    split, target, _ = digits
    source = make_source().eval()
    tiny = CloneConfig(max_cuts=2, max_insertions=1, search_steps=5, train_steps=20)
    patch = clone(source, target, split.clone, classes=[0, 1], config=tiny, progress=False)
    with patch.attached(target):
        out = predict_logits(target, split.test)
    assert out.shape == (len(split.test), 7)


def test_a_cnn_source_clones_into_a_transformers_vit_target(digits):
    split, _, source = digits
    target = _tiny_hf_vit().eval()
    tiny = CloneConfig(max_cuts=1, max_insertions=2, search_steps=5, train_steps=20)
    patch = clone(source, target, split.clone, classes=[2], config=tiny, progress=False)
    images = split.test.tensors[0][:4]
    with torch.no_grad():
        plain = target(pixel_values=images).logits
        with patch.attached(target):
            output = target(pixel_values=images)
    assert type(output).__name__ == "ImageClassifierOutput"
    assert output.logits.shape == (4, 6)
    assert torch.equal(output.logits[:, :5], plain)


def _tiny_hf_vit():
    """A 5-class transformers ViT on 16 px grey digits."""
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=1,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=5,
        )
    )


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any training step runs: bad input must be refused first."""
    import pnc_surgery.search as search

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(search, "train_candidate", refuse)


def test_empty_data_is_refused(digits, no_training):
    _, target, source = digits
    with pytest.raises(InvalidInputError, match="empty"):
        clone(source, target, [], progress=False)


def test_labels_the_source_does_not_have_are_refused(digits, no_training):
    split, target, source = digits
    images = split.clone.tensors[0][:6]
    with pytest.raises(InvalidInputError, match=r"labels \[9\]"):
        clone(source, target, TensorDataset(images, torch.full((6,), 9)), progress=False)


def test_images_of_the_wrong_channels_are_refused(digits, no_training):
    _, target, source = digits
    rgb = TensorDataset(torch.randn(6, 3, 16, 16), torch.zeros(6, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="cannot run on the clone data"):
        clone(source, target, rgb, progress=False)


@pytest.mark.parametrize(
    "classes, message",
    [([], "empty"), ([4], "no examples"), ([7], "not classes of the source"), ([0, 0], "duplicates")],
)
def test_a_classes_list_that_names_nothing_useful_is_refused(digits, no_training, classes, message):
    split, target, source = digits
    with pytest.raises(InvalidInputError, match=message):
        clone(source, target, split.clone, classes=classes, progress=False)


def test_a_bad_config_is_refused():
    with pytest.raises(InvalidInputError, match="gate"):
        CloneConfig(gate="sometimes")
    with pytest.raises(InvalidInputError, match="keep_ratio"):
        CloneConfig(keep_ratio=1.5)
    with pytest.raises(InvalidInputError, match="memory_gb"):
        CloneConfig(memory_gb=0)
    with pytest.raises(InvalidInputError, match="images_per_class"):
        CloneConfig(images_per_class=0)
    with pytest.raises(TypeError, match="feature_memory_gb"):  # renamed memory_gb: it now bounds every stage
        CloneConfig(feature_memory_gb=2)  # type: ignore[call-arg]


def test_a_clone_whose_search_had_one_candidate_saves_and_loads(digits, tmp_path):
    """A one-pair search never measures held-out accuracy; the saved ranking says so (null), and the file loads."""
    split, target, source = digits
    config = CloneConfig(max_cuts=1, max_insertions=1, search_steps=2, train_steps=5)
    patch = clone(source, target, split.clone, classes=split.clone_source_ids, config=config, seed=0, progress=False)
    patch.save_pretrained(tmp_path / "patch")
    loaded = pnc_surgery.Patch.from_pretrained(tmp_path / "patch")
    assert [dict(row) for row in loaded.config.search] == [dict(row) for row in patch.config.search]


def _finalist(insertion: str, accuracy: float, rounds: int) -> clone_module.Candidate:
    """A searched pair as the gate check sees it: its points, held-out accuracy and rounds (no real modules)."""
    point = SimpleNamespace(name=insertion)
    return clone_module.Candidate(
        point, point, torch.nn.Identity(), torch.nn.Identity(), accuracy=accuracy, loss=0.5, rounds=rounds
    )


def _checked(monkeypatch, finalists, pass_rates, replay=True, budget="default"):
    """Run the gate check on ``finalists`` (the first is the search's winner) whose trial gates pass these rates."""
    run = SimpleNamespace(
        winner=finalists[0],
        candidates=finalists,
        ranking=[c.record() for c in finalists],
        held_index=torch.arange(100),
        labels=torch.arange(300) % 3,
        replay=object() if replay else None,
        config=CloneConfig(budget=budget),
        budget=BUDGETS[budget],
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        progress=False,
    )
    monkeypatch.setattr(clone_module, "_build", lambda _run, candidate: candidate)
    monkeypatch.setattr(
        clone_module,
        "_fit_gates",
        lambda _run, patches, *_: [{"gate_positive_rate_heldout": pass_rates[p.insertion.name]} for p in patches],
    )
    return run, clone_module.check_gates(run)


def test_the_gate_check_takes_the_pair_whose_cloned_inputs_come_through_clearly_more_often(monkeypatch):
    late, early = _finalist("late", 0.95, rounds=2), _finalist("early", 0.93, rounds=1)
    run, metrics = _checked(monkeypatch, [late, early], {"late": 0.70, "early": 0.97})
    assert run.winner is early
    assert (metrics["insertion"], run.ranking[0]["insertion"]) == ("early", "early")
    assert [row["gate_pass_rate"] for row in metrics["gate_check"]] == [0.70, 0.97]


def test_the_gate_check_keeps_the_searchs_winner_within_the_heldout_noise(monkeypatch):
    winner, other = _finalist("late", 0.95, rounds=2), _finalist("early", 0.96, rounds=1)
    run, metrics = _checked(monkeypatch, [winner, other], {"late": 0.90, "early": 0.91})
    assert run.winner is winner and metrics["insertion"] == "late"


def test_the_gate_check_needs_replay_data_and_a_rival_at_another_insertion_or_of_a_better_score(monkeypatch):
    winner, rival = _finalist("late", 0.95, rounds=2), _finalist("early", 0.9, rounds=1)
    run, metrics = _checked(monkeypatch, [winner, rival], {"late": 0.1, "early": 1.0}, replay=False)
    assert metrics == {} and run.winner is winner
    run, metrics = _checked(monkeypatch, [winner, rival], {"late": 0.1, "early": 1.0}, budget="fast")
    assert metrics == {} and run.winner is winner, "the fast budget skips the check"
    same_insertion = _finalist("late", 0.9, rounds=1)
    run, metrics = _checked(monkeypatch, [winner, same_insertion], {"late": 0.5})
    assert metrics == {} and run.winner is winner, "a pair the search ranked lower at the same insertion is no rival"


def test_the_gate_check_weighs_the_best_scored_pair_at_the_winners_insertion_too(monkeypatch):
    """The search may prefer a cheaper cut within its noise; after the gate a clearly better pair wins."""
    cheap = _finalist("late", 0.80, rounds=2)
    better = clone_module.Candidate(
        SimpleNamespace(name="early cut"),
        cheap.insertion,
        cheap.branch,
        cheap.adapter,
        accuracy=0.95,
        loss=0.5,
        rounds=2,
    )
    run, metrics = _checked(monkeypatch, [cheap, better], {"late": 0.9})
    assert run.winner is better and metrics["cut"] == "early cut"


def test_a_gate_check_that_keeps_the_searchs_winner_leaves_the_clone_as_it_was(digits, cloned, monkeypatch):
    """The check draws from its own random stream, so where it keeps the winner the patch is the one without it."""
    patch = cloned[0]
    winner = patch.metrics["gate_check"][0]
    assert (patch.metrics["cut"], patch.metrics["insertion"]) == (winner["cut"], winner["insertion"])
    monkeypatch.setitem(BUDGETS, "default", dataclasses.replace(BUDGETS["default"], check_gates=False))
    unchecked = _clone_digits(digits)
    assert "gate_check" not in unchecked.metrics
    mine, theirs = patch.state_dict(), unchecked.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
