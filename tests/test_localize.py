"""Specification of localization's pruning of attention heads.

* ``find_prune_groups`` finds the heads of every attention block after the cut, in timm's ViT (one fused ``qkv``
  projection) and in transformers' (separate ``q_proj``, ``k_proj``, ``v_proj``), beside the MLP hidden units.
* Removing heads physically gives exactly what zeroing their channels at the output projection gives, and a
  patch with pruned heads saves and reloads with the same answers.
* ``pruned_parameters`` counts, without pruning, what a pruning leaves (channels with their norms, heads).
* A parameter budget caps the keep ratios the accuracy tolerance allows: the pruned branch fits it when the ratios
  tried allow, otherwise it keeps the smallest ratio tried; without a budget the tolerance alone decides.
"""

from __future__ import annotations

import pytest
import torch

from pnc_surgery import Patch
from pnc_surgery.backends.base import logits_of
from pnc_surgery.backends.timm import create_model
from pnc_surgery.branch import capture_features
from pnc_surgery.localize import (
    MaskedUnits,
    branch_parameters,
    find_prune_groups,
    keep_indices,
    localize,
    prune,
    pruned_parameters,
)

IMAGES = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def _timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4, num_classes=5
    ).eval()


def _hf_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )
    return ViTForImageClassification(config).eval()


CASES = {
    "timm": (_timm_vit, "patch_embed", ["blocks.0.attn.proj", "blocks.1.attn.proj"]),
    "transformers": (_hf_vit, "vit.embeddings", ["vit.layers.0.attention.o_proj", "vit.layers.1.attention.o_proj"]),
}


def _patch(case: str) -> tuple[Patch, torch.nn.Module, torch.Tensor]:
    build, cut, _ = CASES[case]
    source, target = build(), build()
    patch = Patch.assemble(source, target, cut, cut, [0, 1, 2], source_input=IMAGES[:2], target_input=IMAGES[:2])
    feature = capture_features(source, [cut], IMAGES)[cut]
    return patch.eval(), target, feature


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_heads_of_every_attention_block_after_the_cut_are_a_prune_group(case):
    patch, _, feature = _patch(case)
    groups = find_prune_groups(patch.branch, feature[:2])
    heads = {g.consumer: g for g in groups if g.heads_of is not None}
    assert sorted(heads) == CASES[case][2]
    assert all(g.units == 4 and g.unit == 8 for g in heads.values()), "4 heads of 8 channels each"
    assert any(g.heads_of is None for g in groups), "the MLP hidden units stay groups of their own"


@pytest.mark.parametrize("case", sorted(CASES))
def test_removing_heads_gives_what_zeroing_them_gives_and_survives_a_reload(case, tmp_path):
    patch, target, feature = _patch(case)
    groups = [g for g in find_prune_groups(patch.branch, feature[:2]) if g.heads_of is not None]
    scores = {g.consumer: torch.arange(g.size, dtype=torch.float) for g in groups}
    kept = keep_indices(groups, scores, 0.5)
    assert all(torch.equal(k, torch.arange(16, 32)) for k in kept.values()), "the two best heads, all their channels"
    with torch.no_grad(), MaskedUnits(patch.branch, kept):
        masked = patch.branch(feature)
    prune(patch.branch, groups, kept)
    with torch.no_grad():
        assert torch.allclose(patch.branch(feature), masked, atol=1e-5)
    assert all(patch.branch.model.get_submodule(g.consumer).in_features == 16 for g in groups)
    with patch.attached(target), torch.no_grad():
        expected = logits_of(target(IMAGES))
    reloaded = Patch.load(patch.save(tmp_path / "patch.safetensors"))
    with reloaded.attached(target), torch.no_grad():
        assert torch.allclose(logits_of(target(IMAGES)), expected, atol=1e-5)


def _timm_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", in_chans=1, channels=(8, 16, 32, 64), stem_width=8, num_classes=5).eval()


def _resnet_patch() -> tuple[Patch, torch.Tensor]:
    source, target = _timm_resnet(), _timm_resnet()
    inputs = {"source_input": IMAGES[:2], "target_input": IMAGES[:2]}
    patch = Patch.assemble(source, target, "layer1", "layer1", [0, 1, 2], **inputs)
    return patch.eval(), capture_features(source, ["layer1"], IMAGES)["layer1"]


def _case(case: str) -> tuple[Patch, torch.Tensor]:
    if case == "resnet":
        return _resnet_patch()
    patch, _, feature = _patch(case)
    return patch, feature


@pytest.mark.parametrize("case", ["resnet", *sorted(CASES)])
def test_pruned_parameters_counts_what_pruning_leaves(case):
    patch, feature = _case(case)
    groups = find_prune_groups(patch.branch, feature[:2])
    assert groups and (case != "resnet" or any(g.passthrough for g in groups)), "norms between producer and consumer"
    scores = {g.consumer: torch.rand(g.size, generator=torch.Generator().manual_seed(1)) for g in groups}
    kept = keep_indices(groups, scores, 0.3)
    expected = pruned_parameters(patch.branch, groups, kept)
    assert expected < branch_parameters(patch.branch)
    prune(patch.branch, groups, kept)
    assert branch_parameters(patch.branch) == expected


RATIOS = (0.25, 0.5)


def _localized(case: str, max_parameters: int | None) -> tuple[tuple[float, float], dict, int]:
    """Localize with a floor no ratio reaches (the tolerance alone would keep every unit): (ratios, metrics, size)."""
    patch, feature = _case(case)
    labels = torch.arange(len(feature)) % 3
    ratio, metrics = localize(
        patch.branch,
        [(feature, labels, {})],
        keep_ratio=None,
        keep_ratios=RATIOS,
        tolerance=-1.0,
        max_parameters=max_parameters,
    )
    return (ratio, metrics["head_keep_ratio"]), metrics, branch_parameters(patch.branch)


def _size_at(case: str, ratio: float) -> int:
    patch, feature = _case(case)
    groups = find_prune_groups(patch.branch, feature[:2])
    scores = {g.consumer: torch.ones(g.size) for g in groups}  # the count does not depend on which units stay
    return pruned_parameters(patch.branch, groups, keep_indices(groups, scores, ratio))


@pytest.mark.parametrize("case", ["resnet", "timm"])
def test_a_parameter_budget_lowers_the_ratios_together_until_the_branch_fits(case):
    heads = case == "timm"
    patch, _ = _case(case)
    ratios, metrics, size = _localized(case, None)
    assert ratios == (1.0, 1.0) and size == branch_parameters(patch.branch), "no budget: the tolerance decides"
    assert "tolerated_keep_ratios" not in metrics

    half = _size_at(case, 0.5)
    ratios, metrics, size = _localized(case, half)
    assert ratios == (0.5, 0.5 if heads else 1.0) and size == half
    assert metrics["tolerated_keep_ratios"] == [1.0, 1.0]

    ratios, _, size = _localized(case, half - 1)
    assert ratios == (0.25, 0.25 if heads else 1.0) and size == _size_at(case, 0.25)


def test_a_budget_no_ratio_meets_keeps_the_smallest_ratio_tried():
    ratios, _, size = _localized("timm", 0)
    assert ratios == (0.25, 0.25) and size == _size_at("timm", 0.25) > 0


def test_under_a_budget_head_ratios_the_budget_would_lower_are_not_measured(monkeypatch):
    from pnc_surgery import localize as localize_module

    measured: list[int] = []
    real = localize_module.local_accuracy
    monkeypatch.setattr(localize_module, "local_accuracy", lambda *a: measured.append(1) or real(*a))
    _localized("timm", None)
    unbudgeted, measured[:] = len(measured), []
    ratios, metrics, _ = _localized("timm", _size_at("timm", 0.5) - 1)
    assert ratios == (0.25, 0.25), "the same choice as when every ratio is measured (above)"
    assert len(measured) == unbudgeted - 1, "the heads' 0.5, which the budget lowers to 0.25 anyway, is skipped"
    assert metrics["tolerated_keep_ratios"] == [1.0, 1.0]
