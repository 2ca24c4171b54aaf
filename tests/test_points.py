"""Specification of ``find_points`` and of the source tail, checked on every architecture of the test zoo.

A *point* is a module whose output can be cut: everything the model computes after it depends on that output
alone (plus context such as an attention mask). For every zoo model:

* ``find_points`` returns the points in execution order, named as in ``named_modules()``, with shapes, layouts and
  widths that match what the module really outputs, and at least one point per stage;
* every point is a real cut, and modules inside a block (a conv of a residual block, attention, a norm) are not
  points;
* ``Branch.from_model(model, point, example)`` fed with the feature captured at the point gives back the model's
  logits, for the example input and for other inputs and batch sizes; for text models the attention mask is honoured;
* the model is left exactly as it was: same parameters and buffers, same train/eval modes, no hooks left behind.

Bad input is refused before any work with :class:`InvalidInputError` or :class:`UnsupportedModelError`, and
without an example input ``find_points`` builds one from the model's own configuration.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from zoo import (
    NUM_CLASSES,
    ZOO,
    build,
    context_of,
    cut_error,
    logits_of,
    other_input,
    run_model,
    tiny_bart,
    tiny_t5,
)

from pnc_surgery import Point, check_cut, find_points
from pnc_surgery.backends import backend_for
from pnc_surgery.branch import Branch, capture_features
from pnc_surgery.errors import InvalidInputError, UnsupportedModelError

MODELS = list(ZOO)
TEXT_MODELS = [name for name, entry in ZOO.items() if entry.text]
ATOL = 1e-5


# ------------------------------------------------------------------------------------------------ helpers
def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


@torch.no_grad()
def _trace(model: nn.Module, example: Any) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Names of the modules in the order of their first call, and each one's first output shape."""
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            if name not in shapes:
                order.append(name)
                tensor = _first_tensor(out)
                shapes[name] = tuple(tensor.shape) if tensor is not None else ()

        handles.append(module.register_forward_hook(hook))
    try:
        run_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return order, shapes


def _fingerprint(model: nn.Module) -> dict[str, str]:
    """A hash of every parameter and buffer, by name."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        name: hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        + str(tuple(t.shape))
        + str(t.dtype)
        for name, t in tensors.items()
    }


def _hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(getattr(m, "_backward_pre_hooks", {})),
            len(m._state_dict_hooks),
            len(m._load_state_dict_pre_hooks),
        )
        for name, m in model.named_modules()
    }


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@torch.no_grad()
def _logits(model: nn.Module, example: Any) -> torch.Tensor:
    return logits_of(run_model(model, example))


def _feature(model: nn.Module, point: Point, example: Any) -> torch.Tensor:
    return capture_features(model, [point.name], example)[point.name]


@torch.no_grad()
def _tail_logits(tail: nn.Module, feature: torch.Tensor, example: Any) -> torch.Tensor:
    out = tail(feature, **context_of(example))
    assert isinstance(out, torch.Tensor), f"a tail returns a logits tensor, got {type(out).__name__}"
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


_POINTS: dict[str, list[Point]] = {}


def _points(name: str) -> list[Point]:
    """``find_points`` on a fresh zoo model, computed once per model for the read-only tests."""
    if name not in _POINTS:
        model, example = build(name)
        _POINTS[name] = find_points(model, example)
    return _POINTS[name]


# ------------------------------------------------------------------------------------- what points are
@pytest.mark.parametrize("name", MODELS)
def test_points_are_named_modules_in_execution_order(name: str) -> None:
    model, example = build(name)
    points = _points(name)
    order, _ = _trace(model, example)
    names = [p.name for p in points]

    assert all(isinstance(p, Point) for p in points)
    assert len(set(names)) == len(names), f"duplicate points: {names}"
    unknown = [n for n in names if n not in order]
    assert not unknown, f"points that are not called modules of {name}: {unknown}"
    indices = [p.index for p in points]
    assert indices == sorted(indices) and len(set(indices)) == len(indices), f"indices not increasing: {indices}"
    assert names == sorted(names, key=order.index), f"points not in execution order: {names}"


@pytest.mark.parametrize("name", MODELS)
def test_at_least_one_point_per_stage(name: str) -> None:
    points = _points(name)
    assert len(points) >= ZOO[name].min_points, (
        f"{name}: {len(points)} points, expected at least {ZOO[name].min_points}: {[p.name for p in points]}"
    )


@pytest.mark.parametrize("name", MODELS)
def test_point_shape_layout_and_width_match_the_module_output(name: str) -> None:
    model, example = build(name)
    _, shapes = _trace(model, example)
    batch = 2
    pixels = example if isinstance(example, torch.Tensor) else example.get("pixel_values")
    for p in _points(name):
        where = f"{name}:{p.name}"
        assert shapes[p.name] == (batch, *p.shape), f"{where}: point shape {p.shape}, module output {shapes[p.name]}"
        assert p.layout in ZOO[name].layouts, f"{where}: layout {p.layout} not in {sorted(ZOO[name].layouts)}"
        if p.layout == "NCHW":
            assert len(p.shape) == 3 and p.width == p.shape[0], f"{where}: {p}"
        elif p.layout == "NHWC":
            assert len(p.shape) == 3 and p.width == p.shape[2], f"{where}: {p}"
        elif p.layout == "NLC":
            assert len(p.shape) == 2 and p.width == p.shape[1], f"{where}: {p}"
        else:  # pragma: no cover - layouts are a closed set
            raise AssertionError(f"{where}: unknown layout {p.layout}")
        module = model.get_submodule(p.name)
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            # torch's 2-d layers output NCHW whatever the sizes (C == H == W must not fool the layout guess)
            assert p.layout == "NCHW", f"{where}: a {type(module).__name__} outputs NCHW, point says {p.layout}"
        assert p.reduction is None or (isinstance(p.reduction, int) and p.reduction >= 1), f"{where}: {p}"
        if p.reduction is not None and p.layout in ("NCHW", "NHWC") and pixels is not None:
            height = p.shape[1] if p.layout == "NCHW" else p.shape[0]
            assert height * p.reduction == pixels.shape[-2], (
                f"{where}: reduction {p.reduction} but the feature is {height} high for a {pixels.shape[-2]} input"
            )


@pytest.mark.parametrize("name", MODELS)
def test_every_point_is_a_cut(name: str) -> None:
    """Replacing a point's output by another input's makes the model answer as for that other input."""
    model, example = build(name)
    for p in _points(name):
        error = cut_error(model, p.name, example)
        assert error < 1e-4, f"{name}:{p.name} is not a cut (relative logit error {error:.3g})"


@pytest.mark.parametrize("name", MODELS)
def test_sub_block_modules_are_not_points(name: str) -> None:
    names = {p.name for p in _points(name)}
    wrong = sorted(names & set(ZOO[name].not_points))
    assert not wrong, f"{name}: modules inside a block offered as points: {wrong}"


def test_swin_stages_are_nhwc() -> None:
    """timm Swin stages keep (B, H, W, C) features; its stage outputs must say so. (The last stage's output is
    also the output of the ``layers`` container, which may stand for it.)"""
    stage_names = {"layers.0", "layers.1", "layers.2", "layers.3", "layers"}
    stages = [p for p in _points("timm_swin") if p.name in stage_names]
    assert len(stages) == 4, [p.name for p in _points("timm_swin")]
    assert all(p.layout == "NHWC" for p in stages), stages


def test_xception_feature_info_hooks_are_not_taken_as_points() -> None:
    """timm's feature_info marks ``blocks.N.stack.act3``; those are hook points, not cuts."""
    model, _ = build("timm_xception")
    hooked = [f["module"] for f in model.feature_info if ".stack." in f["module"]]
    assert hooked, "the zoo xception should have feature_info hooks inside blocks"
    assert not {p.name for p in _points("timm_xception")} & set(hooked)


# ---------------------------------------------------------------------------------------------- the tail
@pytest.mark.parametrize("name", MODELS)
def test_capture_features_returns_each_point_output(name: str) -> None:
    model, example = build(name)
    points = _points(name)
    features = capture_features(model, [p.name for p in points], example)
    assert set(features) == {p.name for p in points}
    for p in points:
        assert features[p.name].shape == (2, *p.shape), f"{name}:{p.name}"
        single = _feature(model, p, example)
        assert torch.equal(features[p.name], single), f"{name}:{p.name}: capture depends on what else is captured"


@pytest.mark.parametrize("name", MODELS)
def test_tail_from_every_point_reproduces_the_logits(name: str) -> None:
    model, example = build(name)
    expected = _logits(model, example)
    other = other_input(example)
    expected_other = _logits(model, other)
    for p in _points(name):
        where = f"{name}:{p.name}"
        tail = Branch.from_model(model, p, example)
        got = _tail_logits(tail, _feature(model, p, example), example)
        assert got.shape == (2, NUM_CLASSES), where
        assert torch.allclose(got, expected, atol=ATOL), f"{where}: max diff {_max_diff(got, expected):.3g}"
        # the tail computes from the feature it is given, not from the example it was built with
        got_other = _tail_logits(tail, _feature(model, p, other), other)
        assert torch.allclose(got_other, expected_other, atol=ATOL), (
            f"{where}: on another input, max diff {_max_diff(got_other, expected_other):.3g}"
        )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 3])
def test_tail_accepts_other_batch_sizes(name: str, batch: int) -> None:
    model, example = build(name)
    points = _points(name)
    x = other_input(example, batch=batch)
    expected = _logits(model, x)
    for p in (points[0], points[len(points) // 2], points[-1]):
        tail = Branch.from_model(model, p, example)
        got = _tail_logits(tail, _feature(model, p, x), x)
        assert torch.allclose(got, expected, atol=ATOL), (
            f"{name}:{p.name} batch {batch}: {_max_diff(got, expected):.3g}"
        )


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_text_tail_honours_the_attention_mask(name: str) -> None:
    """Row 1 of the example is padded from position 5: with the mask, what the feature holds at padded positions
    does not matter; without the mask, it does."""
    model, example = build(name)
    mask = example["attention_mask"]
    pad = ~mask.bool()
    expected = _logits(model, example)
    order, _ = _trace(model, example)
    for p in _points(name):
        where = f"{name}:{p.name}"
        assert p.layout == "NLC", where
        tail = Branch.from_model(model, p, example)
        feature = _feature(model, p, example)
        with torch.no_grad():
            masked = tail(feature, attention_mask=mask)
            unmasked = tail(feature, attention_mask=torch.ones_like(mask))
            noisy = feature.clone()
            noisy[pad] = torch.randn_like(noisy[pad]) * 10
            masked_noisy = tail(noisy, attention_mask=mask)
        assert torch.allclose(masked, expected, atol=ATOL), f"{where}: {_max_diff(masked, expected):.3g}"
        assert torch.allclose(masked_noisy, expected, atol=ATOL), f"{where}: padded positions leak into the logits"
        assert torch.allclose(unmasked[0], expected[0], atol=ATOL), f"{where}: the unpadded row changed"
        if any(re.search(r"attention$|attn$", n) for n in order[order.index(p.name) + 1 :]):
            # with an attention layer left in the tail, dropping the mask changes the padded row
            assert not torch.allclose(unmasked[1], expected[1], atol=ATOL), f"{where}: the mask is ignored"


@pytest.mark.parametrize("name", MODELS)
def test_tail_at_a_sub_block_module_is_refused(name: str) -> None:
    """Cutting inside a block would silently drop the residual or attention context: refused, never a wrong tail."""
    model, example = build(name)
    for module_name in ZOO[name].not_points:
        with pytest.raises(UnsupportedModelError):
            Branch.from_model(model, module_name, example)


def test_tail_at_a_non_cut_is_refused_even_when_logits_hardly_move() -> None:
    """Fresh BatchNorm statistics make a random Xception's logits nearly input-independent (spread ~1e-6), so
    checking the tail's logits against the model's with an absolute tolerance accepts any tail. The check must
    be relative to how much the model's answers move (or look at the pre-logits)."""
    from zoo import timm_xception

    fresh, example = timm_xception(calibrate=False)
    with torch.no_grad():
        spread = (fresh(example) - fresh(other_input(example))).abs().max().item()
    assert spread < 1e-4, "this test needs a model whose logits hardly depend on the input"
    with pytest.raises(UnsupportedModelError):
        Branch.from_model(fresh, "blocks.1.stack.act3", example)


def test_capture_features_of_an_unknown_module_is_invalid_input() -> None:
    model, example = build("timm_resnet18")
    with pytest.raises(InvalidInputError, match="nope"):
        capture_features(model, ["layer1", "nope"], example)


@pytest.mark.parametrize("name", [*MODELS[:1], "timm_vit", "hf_bert"])
def test_tail_is_a_copy(name: str) -> None:
    model, example = build(name)
    p = _points(name)[len(_points(name)) // 2]
    tail = Branch.from_model(model, p, example)
    assert isinstance(tail, nn.Module)
    model_storage = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    shared = [n for n, t in tail.named_parameters() if t.untyped_storage().data_ptr() in model_storage]
    assert not shared, f"the tail shares parameters with the model: {shared[:5]}"


# ------------------------------------------------------------------------------------ model left alone
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["eval", "mixed"])
def test_model_is_unchanged(name: str, mode: str) -> None:
    """In eval mode, and in train mode with one child left in eval mode (BatchNorm statistics would move if the
    library probed in train mode; the mixed modes must come back as they were)."""
    model, example = build(name)
    if mode == "mixed":
        model.train()
        next(iter(model.children())).eval()
    fingerprint, modes, hooks = _fingerprint(model), _modes(model), _hook_counts(model)

    points = find_points(model, example)
    assert _fingerprint(model) == fingerprint, f"{name}: find_points changed parameters or buffers"
    assert _modes(model) == modes, f"{name}: find_points did not restore train/eval modes"
    assert _hook_counts(model) == hooks, f"{name}: find_points left hooks behind"

    for p in (points[0], points[-1]):
        feature = capture_features(model, [p.name], example)[p.name]
        tail = Branch.from_model(model, p, example)
        tail(feature, **context_of(example))
    assert _fingerprint(model) == fingerprint, f"{name}: capture_features/Branch changed parameters or buffers"
    assert _modes(model) == modes, f"{name}: capture_features/Branch did not restore train/eval modes"
    assert _hook_counts(model) == hooks, f"{name}: capture_features/Branch left hooks behind"


# ------------------------------------------------------------------------------------------- bad input
def test_non_module_is_invalid_input() -> None:
    with pytest.raises(InvalidInputError):
        find_points("resnet")
    with pytest.raises(InvalidInputError):
        find_points(None)


@pytest.mark.parametrize(
    "name, bad, expected",
    [
        ("timm_resnet18", torch.randn(2, 1, 32, 32), r"\b3\b"),  # 1 channel for a 3-channel model
        ("timm_resnet18", torch.randn(3, 32, 32), r"\(B, C, H, W\)|4-?d|batch"),  # no batch dimension
        ("timm_vit", torch.randn(2, 3, 48, 48), r"\b32\b"),  # wrong size for a fixed position embedding
        ("hf_vit", {"pixel_values": torch.randn(2, 1, 32, 32)}, r"\b3\b"),
    ],
    ids=["channels", "rank", "vit-size", "hf-channels"],
)
def test_wrong_example_shape_is_invalid_input_naming_the_expected_shape(name: str, bad: Any, expected: str) -> None:
    model, _ = build(name)
    with pytest.raises(InvalidInputError) as info:
        find_points(model, bad)
    message = str(info.value)
    given = tuple((bad if isinstance(bad, torch.Tensor) else bad["pixel_values"]).shape)
    assert str(given) in message, f"message does not name the given shape {given}: {message}"
    assert re.search(expected, message.replace(str(given), "")), f"message does not name what is expected: {message}"


def test_wrong_example_type_is_invalid_input() -> None:
    model, _ = build("hf_bert")
    with pytest.raises(InvalidInputError):
        find_points(model, {"pixel_values": torch.randn(2, 3, 32, 32)})
    model, _ = build("timm_resnet18")
    with pytest.raises(InvalidInputError):
        find_points(model, "an image")


def _headless_timm_resnet() -> tuple[nn.Module, Any]:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0, channels=(8, 16, 32, 64), stem_width=8)
    return model.eval(), torch.randn(2, 3, 32, 32)


def _headless_timm_vit() -> tuple[nn.Module, Any]:
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    return model.eval(), torch.randn(2, 3, 32, 32)


def _headless_hf_vit() -> tuple[nn.Module, Any]:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=0,
    )
    return ViTForImageClassification(config).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}


def _feature_extractor() -> tuple[nn.Module, Any]:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    return model.eval(), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize(
    "make",
    [_headless_timm_resnet, _headless_timm_vit, _headless_hf_vit, _feature_extractor],
    ids=["timm-resnet-num_classes=0", "timm-vit-num_classes=0", "hf-vit-num_labels=0", "sequential-features"],
)
def test_model_without_classifier_is_unsupported(make: Callable[[], tuple[nn.Module, Any]]) -> None:
    """A model whose output is pooled features or a feature map has no class rows to clone: refused, saying why."""
    model, example = make()
    with pytest.raises(UnsupportedModelError) as info:
        find_points(model, example)
    message = str(info.value).lower()
    assert any(w in message for w in ("classifier", "num_classes", "logits", "head")), str(info.value)


def test_plain_torch_classifier_is_supported() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, NUM_CLASSES),
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    points = find_points(model, x)
    assert points, "a plain Sequential classifier has cut points"
    for p in points:
        tail = Branch.from_model(model, p, x)
        assert torch.allclose(_tail_logits(tail, _feature(model, p, x), x), _logits(model, x), atol=ATOL), p.name


class _SharedBlockNet(nn.Module):
    """A classifier that applies the same residual block twice (weight sharing), then pools."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block(x)
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


def test_shared_module_points_give_exact_tails() -> None:
    """A module called twice: whatever points are offered, a tail from each one is exact on other inputs too."""
    torch.manual_seed(0)
    model = _SharedBlockNet().eval()
    x = torch.randn(2, 3, 16, 16)
    x2 = torch.randn(2, 3, 16, 16)
    points = find_points(model, x)
    assert [p.name for p in points if p.name.startswith("block")] == [], "a shared block's output is not one place"
    for p in points:
        tail = Branch.from_model(model, p, x)
        got = _tail_logits(tail, _feature(model, p, x2), x2)
        assert torch.allclose(got, _logits(model, x2), atol=ATOL), p.name


# ------------------------------------------------------------------------------- default example input
def _summary(points: list[Point]) -> list[tuple[Any, ...]]:
    return [(p.name, p.shape, p.layout, p.width) for p in points]


@pytest.mark.parametrize(
    "name, explicit",
    [
        ("timm_resnet18", lambda m: torch.randn(2, *m.pretrained_cfg["input_size"])),
        ("timm_vit", lambda m: torch.randn(2, 3, 32, 32)),  # built with img_size=32: pretrained_cfg still says 224
        ("hf_vit", lambda m: {"pixel_values": torch.randn(2, 3, 32, 32)}),
        ("hf_convnext", lambda m: {"pixel_values": torch.randn(2, 3, 32, 32)}),
    ],
)
def test_find_points_without_example_uses_the_model_config(name: str, explicit: Any) -> None:
    model, _ = build(name)
    assert _summary(find_points(model)) == _summary(find_points(model, explicit(model)))


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_find_points_without_example_on_text_models(name: str) -> None:
    """Text models get token ids from their config; sequence length may differ from the zoo example."""
    model, example = build(name)
    default, explicit = find_points(model), find_points(model, example)
    assert [(p.name, p.layout, p.width) for p in default] == [(p.name, p.layout, p.width) for p in explicit]


def test_default_example_follows_in_chans() -> None:
    import timm

    model = timm.create_model(
        "resnet18", pretrained=False, num_classes=NUM_CLASSES, in_chans=1, channels=(8, 16, 32, 64), stem_width=8
    ).eval()
    assert _summary(find_points(model)) == _summary(find_points(model, torch.randn(2, 1, 224, 224)))


# ------------------------------------------------------------------------ reach: models outside the zoo
def _gpt2_padded() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A GPT-2 style decoder classifier (pools the last non-pad token) and a padded batch, as a tokenizer pads it."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32,
        n_layer=3,
        n_head=2,
        vocab_size=99,
        n_positions=32,
        num_labels=NUM_CLASSES,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    ids = torch.randint(2, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = config.pad_token_id
    return GPT2ForSequenceClassification(config).eval(), {"input_ids": ids, "attention_mask": mask}


def test_decoder_that_pools_the_last_non_pad_token_has_points_on_a_padded_batch() -> None:
    model, example = _gpt2_padded()
    names = [p.name for p in find_points(model, example)]
    assert {"transformer.h.0", "transformer.h.1", "transformer.h.2"} <= set(names), names
    assert {"transformer.h.0", "transformer.h.1", "transformer.h.2"} <= {p.name for p in find_points(model)}


def test_second_input_keeps_pad_and_masked_positions_and_draws_no_pad_elsewhere() -> None:
    from pnc_surgery.backends import backend_for

    model, example = _gpt2_padded()
    example["attention_mask"][0, -1] = 0  # a masked position that does not hold the pad id
    other = backend_for(model).second_input(model, example)
    ids, new = example["input_ids"], other["input_ids"]
    kept = (ids == 0) | (example["attention_mask"] == 0)
    assert torch.equal(new[kept], ids[kept])
    assert not (new[~kept] == 0).any(), "a pad id drawn at a real token moves the pooled position"
    assert (new[~kept] != ids[~kept]).float().mean() > 0.8
    assert torch.equal(other["attention_mask"], example["attention_mask"])


def test_token_model_without_a_known_vocabulary_gets_second_inputs_in_range() -> None:
    """A plain torch text model: the second input's ids come from those the example holds (its embedding has no
    more)."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(2)])
            self.head = nn.Linear(16, NUM_CLASSES)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(self.embed(ids)).mean(1))

    torch.manual_seed(0)
    names = [p.name for p in find_points(Tokens().eval(), torch.randint(0, 50, (2, 12)))]
    assert names[0] == "embed" and {"blocks.0", "blocks"} <= set(names), names


def test_timm_model_keeping_its_image_size_on_the_stem_is_read_at_the_size_it_was_built_with() -> None:
    """MLP-Mixer keeps ``img_size`` on ``stem``, not ``patch_embed``; its pretrained_cfg still says 224."""
    import timm

    from pnc_surgery.backends import TimmBackend

    model = timm.create_model("mixer_s16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=32).eval()
    assert TimmBackend().image_size(model) == (32, 32)
    assert TimmBackend().architecture(model)["kwargs"]["img_size"] == [32, 32]
    assert _summary(find_points(model)) == _summary(find_points(model, torch.randn(2, 3, 32, 32)))


def test_transformers_image_model_takes_a_pixel_tensor_as_its_main_input() -> None:
    model, example = build("hf_vit")
    assert _summary(find_points(model, example["pixel_values"])) == _summary(find_points(model, example))
    tail = Branch.from_model(model, find_points(model)[1], example["pixel_values"])
    assert tail.main_input_name == "pixel_values"


def test_explain_gives_the_reason_of_each_candidate_that_is_not_a_point(capsys: pytest.CaptureFixture) -> None:
    model, example = build("timm_resnet18")
    points = find_points(model, example, explain=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"find_points(ResNet): {len(points)} points")
    verdict = {line.strip().split(": ", 1)[0]: line.strip().split(": ", 1)[1] for line in lines[1:-1]}
    assert all(verdict[p.name] == "point" for p in points)
    assert "residual path" in verdict["layer1.0.downsample"], verdict["layer1.0.downsample"]
    assert "same tensor as 'layer1'" in verdict["layer1.1"], verdict["layer1.1"]
    assert "flat (B, C) features" in verdict["global_pool"], verdict["global_pool"]
    assert "check_cut" in lines[-1], "modules inside blocks are not candidates; the footer says how to test one"
    assert find_points(model, example) == points


def test_flat_feature_models_are_refused_naming_the_reason() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)).eval()
    with pytest.raises(UnsupportedModelError, match=r"flat \(B, C\) features"):
        find_points(model, torch.randn(2, 1, 8, 8))


@pytest.mark.slow
def test_every_inception_v3_stage_output_is_a_point() -> None:
    """Inception's Mixed_* blocks concatenate parallel branches; each block output is a cut and is offered."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("inception_v3", pretrained=False, num_classes=NUM_CLASSES).eval()
    names = {p.name for p in find_points(model, torch.randn(2, 3, 75, 75))}
    stages = {n for n, _ in model.named_children() if n.startswith("Mixed_")}
    assert len(stages) == 11 and stages <= names, sorted(stages - names)


def test_timm_model_whose_stem_is_not_a_convolution_takes_its_stated_channels() -> None:
    """CSATv2 reads the image with a DCT stem; its first Conv2d takes 64 channels, the model takes 3."""
    import timm

    from pnc_surgery.backends import TimmBackend

    model = timm.create_model("csatv2", pretrained=False, num_classes=NUM_CLASSES)
    assert TimmBackend().in_chans(model) == 3


def _gpt_neo() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """GPT-Neo's blocks return ``(hidden, attention weights)``."""
    from transformers import GPTNeoConfig, GPTNeoForSequenceClassification

    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=99,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        attention_types=[[["global", "local"], 1], [["global"], 1]],
        max_position_embeddings=32,
        num_labels=NUM_CLASSES,
        pad_token_id=0,
    )
    model, example = GPTNeoForSequenceClassification(config).eval(), _gpt2_padded()[1]
    return model, example


def _pvt() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """PVT's patch embeddings return ``(tokens, height, width)``, its blocks a one-element tuple."""
    from transformers import PvtConfig, PvtForImageClassification

    torch.manual_seed(0)
    config = PvtConfig(
        image_size=32,
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 2, 4],
        mlp_ratios=[2] * 4,
        num_labels=NUM_CLASSES,
    )
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return PvtForImageClassification(config).eval(), {"pixel_values": pixels}


@pytest.mark.parametrize(
    "make, expected",
    [
        (_gpt_neo, ["transformer.h.0", "transformer.h.1", "transformer.h.2"]),
        (_pvt, [f"pvt.encoder.{part}" for i in range(3) for part in (f"patch_embeddings.{i}", f"block.{i}.0")]),
    ],
    ids=["gpt_neo", "pvt"],
)
def test_layers_returning_a_tuple_are_points_whose_feature_is_its_first_element(
    make: Callable[[], tuple[nn.Module, Any]], expected: list[str]
) -> None:
    """Only the tuple's leading tensor is swapped in the cut test, captured as the feature, and fed to the tail
    (with the tuple's other elements recorded as constants: PVT's height and width)."""
    from pnc_surgery.patch.config import BranchSpec

    model, example = make()
    points = {p.name: p for p in find_points(model, example)}
    assert set(expected) <= set(points), sorted(points)
    expected_logits = _logits(model, example)
    for name in expected:
        module_output = _trace(model, example)[1][name]
        assert (points[name].shape, points[name].width) == (module_output[1:], module_output[-1]), name
        tail = Branch.from_model(model, points[name], example)
        assert BranchSpec.from_dict(tail.spec()).to_dict() == tail.spec()
        logits = _tail_logits(tail, _feature(model, points[name], example), example)
        assert torch.allclose(logits, expected_logits, atol=ATOL), f"{name}: {_max_diff(logits, expected_logits)}"
    assert Branch.from_model(model, expected[0], example).cut_extras is not None


def test_tuple_constants_in_a_branch_spec_are_capped_by_the_feature_size() -> None:
    """A patch file's constants reach the source's forward (PVT reshapes by them): no size beyond the feature's."""
    from pnc_surgery.errors import PatchFormatError
    from pnc_surgery.patch.config import BranchSpec

    model, example = _pvt()
    spec = Branch.from_model(model, "pvt.encoder.patch_embeddings.1", example).spec()
    assert BranchSpec.from_dict(spec).cut_extras == (4, 4)
    with pytest.raises(PatchFormatError, match="cut_extras"):
        BranchSpec.from_dict({**spec, "cut_extras": [2**20, 4]})


def test_a_tuple_element_the_cut_module_passed_on_is_named_in_the_spec_and_taken_from_the_tails_call() -> None:
    """T5's blocks pass on the position bias they are given: the tail's feed returns the one its call is given, so
    a patch file names the argument, and a loaded branch computes the same logits."""
    from pnc_surgery.errors import PatchFormatError
    from pnc_surgery.patch.config import BranchSpec

    model, example = tiny_t5()
    tail = Branch.from_model(model, "transformer.decoder.block.1", example)
    spec = tail.spec()
    assert spec["cut_extras"] == [{"argument": 2}, {"argument": 5}], "the self- and cross-attention position biases"
    assert BranchSpec.from_dict(spec).to_dict() == spec
    rebuilt = Branch.from_spec(spec, backend_for(model).architecture(model))
    rebuilt.load_state_dict(tail.state_dict(), assign=True)
    other = _other_ids(example)
    feature = capture_features(model, ["transformer.decoder.block.1"], other)["transformer.decoder.block.1"]
    with torch.no_grad():
        assert torch.allclose(rebuilt(feature, **other), model(**other).logits, atol=ATOL)
    for bad in ({"argument": 2, "value": 3}, {"argument": [2]}, {"argument": 99}):
        with pytest.raises(PatchFormatError, match="cut_extras"):
            BranchSpec.from_dict({**spec, "cut_extras": [bad, None]})


def test_timm_model_with_a_space_to_depth_stem_takes_the_image_channels() -> None:
    """TResNet folds 4x4 pixels into channels before its first conv, which therefore takes 48 channels."""
    import timm

    from pnc_surgery.backends import TimmBackend

    with torch.device("meta"):
        model = timm.create_model("tresnet_m", pretrained=False)
    assert TimmBackend().in_chans(model) == 3


def test_a_classifier_whose_output_names_its_logits_otherwise_is_read() -> None:
    """PPLCNet returns its class scores as ``last_hidden_state`` of a ``ModelOutput`` that has no ``logits``."""
    from transformers.modeling_outputs import BaseModelOutputWithNoAttention

    from pnc_surgery.backends.base import logits_of, replace_logits

    scores = torch.randn(2, NUM_CLASSES)
    output = BaseModelOutputWithNoAttention(last_hidden_state=scores)
    assert logits_of(output) is scores
    assert logits_of(replace_logits(output, scores * 2)).equal(scores * 2)


def test_a_model_whose_woken_residual_paths_overflow_is_still_tested() -> None:
    """Zero-init gains woken to one can overflow a deep stack (NaN answers); the probe then wakes them less."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix, self.gain = nn.Linear(8, 8), nn.Parameter(torch.zeros(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.gain * self.mix(x) * 80  # over 30 blocks: finite with gains of 0.1, infinite with one

    class Mean(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), *[Block() for _ in range(30)], Mean(), nn.Linear(8, NUM_CLASSES)).eval()
    names = [p.name for p in find_points(model, torch.randn(2, 5, 8))]
    assert [str(i) for i in range(1, 31)] == names[1:31], names


@pytest.mark.parametrize("name", ["timm_resnet18", "hf_bert"])
def test_points_do_not_depend_on_how_many_candidates_share_a_forward(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large features are tested a few candidates a forward (large batches run slower per row); the verdicts stay."""
    import pnc_surgery.points as points_module

    model, example = build(name)
    together = find_points(model, example)
    monkeypatch.setattr(points_module, "SUBSTITUTION_ELEMENTS", 1)
    assert find_points(model, example) == together


# ------------------------------------------------------------------ encoder-decoder classifiers: points that read ids
def _bart() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A BART sequence classifier (its decoder reads the token ids itself) and a padded batch ending in eos."""
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 8:], mask[1, 8:] = 0, 0
    ids[0, 11], ids[1, 7] = 1, 1
    return tiny_bart(vocab_size=64), {"input_ids": ids, "attention_mask": mask}


def test_encoder_layers_of_an_encoder_decoder_classifier_are_points_that_read_the_token_ids() -> None:
    """No encoder layer of BART determines the answer alone (the decoder embeds the ids itself), but with the ids
    it does; the last decoder layer needs nothing else; an earlier decoder layer also needs the encoder's output,
    which a branch cut there computes from the ids (its encoder stays live)."""
    model, example = _bart()
    points = {p.name: (p.reads_input, p.live) for p in find_points(model, example)}
    encoder = (
        "model.encoder.embed_positions",
        "model.encoder.embed_tokens",
        "model.encoder.layernorm_embedding",
        "model.encoder.layers.0",
        "model.encoder.layers.1",
    )
    assert points == {
        "model.encoder.layers.0": (True, ()),
        "model.encoder.layers.1": (True, ()),
        "model.decoder.layers.0": (True, encoder),
        "model.decoder.layers.1": (False, ()),
    }, points
    assert check_cut(model, "model.encoder.layers.1", example) is True
    assert check_cut(model, "model.decoder.layers.0", example) is True
    assert check_cut(model, "model.decoder.layers.1", example) is False
    with pytest.raises(UnsupportedModelError, match="residual path, attention context"):
        check_cut(model, "model.decoder.layers.0.self_attn", example)
    bert, text = build("hf_bert")
    assert not any(p.reads_input for p in find_points(bert, text)), "an encoder's points need no ids"


def test_a_residual_read_around_a_cut_inside_one_stack_is_not_computed_live() -> None:
    """An attention output is read again after the MLP that follows it (the residual): the MLP's output is no cut,
    with or without the ids, because a branch keeps only a stack that finished before the cut's stack began live."""
    bert, text = build("hf_bert")
    with pytest.raises(UnsupportedModelError, match="residual path"):
        check_cut(bert, "bert.encoder.layer.0.intermediate", text)


def _other_ids(example: dict[str, torch.Tensor], vocab: int = 64) -> dict[str, torch.Tensor]:
    """The example with its ordinary token ids (above 2: not pad, eos or bos) replaced by others."""
    ids = example["input_ids"]
    return {**example, "input_ids": torch.where(ids > 2, (ids * 7) % (vocab - 3) + 3, ids)}


@pytest.mark.parametrize(
    ("model_name", "cut"),
    [
        ("bart", "model.encoder.layers.0"),
        ("bart", "model.decoder.layers.0"),
        ("t5", "transformer.encoder.block.1"),
        ("t5", "transformer.decoder.block.1.layer.1"),
    ],
)
def test_a_tail_that_reads_the_ids_reproduces_the_logits_of_other_inputs_from_their_feature_and_ids(
    model_name: str, cut: str
) -> None:
    """Cut in the encoder, the tail gives the ids to the decoder; cut in the decoder, it also computes the encoder
    from them (T5: and passes on the position bias its cut block was given)."""
    model, example = _bart() if model_name == "bart" else tiny_t5()
    tail = Branch.from_model(model, cut, example)
    assert tail.reads_input and tail.context_keys == ("input_ids", "attention_mask")
    other = _other_ids(example)
    feature = capture_features(model, [cut], other)[cut]
    with torch.no_grad():
        expected = model(**other).logits
        assert torch.allclose(tail(feature, **other), expected, atol=ATOL)
        stand_in = tail(feature, attention_mask=other["attention_mask"])
    assert not torch.allclose(stand_in, expected, atol=10 * ATOL), "without the ids the rest reads stand-in tokens"


def test_a_tail_cut_in_the_decoder_keeps_the_encoder_and_stubs_what_the_decoder_did_before_the_cut() -> None:
    model, example = _bart()
    tail = Branch.from_model(model, "model.decoder.layers.0", example)
    assert tail.model.model.encoder.layers[1].fc1.weight.numel() > 0, "the encoder is computed from the ids"
    decoder = tail.model.model.decoder
    assert "model.decoder.layernorm_embedding" in tail.stubs and decoder.layernorm_embedding.weight.numel() == 0
    assert not any(name.startswith("model.encoder.") for name in tail.stubs)
    assert not Branch.from_model(model, "model.decoder.layers.1", example).reads_input


def test_t5s_first_blocks_are_no_points_their_later_blocks_read_the_ids() -> None:
    """T5's first block makes the position bias every later block is given: a branch fed at the first block could
    not rebuild it, so it is no point (and says why); later blocks pass the bias on and are points with the ids; one
    dropout module serves the encoder's start and end, so a branch cut in the encoder computes it live."""
    model, example = tiny_t5()
    points = {p.name: p for p in find_points(model, example)}
    assert "transformer.encoder.block.0" not in points and "transformer.decoder.block.0" not in points
    with pytest.raises(UnsupportedModelError, match="could not rebuild it"):
        check_cut(model, "transformer.encoder.block.0", example)
    encoder_cut = points["transformer.encoder.block.1"]
    assert encoder_cut.reads_input and encoder_cut.live == ("transformer.encoder.dropout",)
    decoder_cut = points["transformer.decoder.block.1"]
    assert decoder_cut.reads_input and "transformer.encoder.block.2" in decoder_cut.live
    assert not points["transformer.decoder.block.2"].reads_input, "the last block needs nothing but its output"


def test_point_descriptions_keep_whether_they_read_the_input() -> None:
    model, example = _bart()
    points = find_points(model, example)
    assert any(point.live for point in points)
    for point in points:
        assert Point.from_dict(point.to_dict()) == point
    old_file = {k: v for k, v in point.to_dict().items() if k not in ("reads_input", "live")}
    assert Point.from_dict(old_file).reads_input is False and Point.from_dict(old_file).live == ()


def test_an_encoder_only_model_spends_no_forward_on_points_that_read_the_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only candidates followed by a module given token ids (a decoder's embedding) can read them: BERT has none, so
    its points are found with one recording forward more than the plain test, not a chunk per candidate."""
    import pnc_surgery.points as points

    forwards: list[str] = []
    record = points._record_calls
    monkeypatch.setattr(points, "_record_calls", lambda *a, **k: forwards.append("record") or record(*a, **k))
    bert, text = build("hf_bert")
    assert not any(p.reads_input for p in find_points(bert, text))
    assert forwards == ["record"]
    forwards.clear()
    model, example = _bart()
    assert any(p.reads_input for p in find_points(model, example))
    assert forwards == ["record"] * 3, "the ids read after the encoder: its layers are tested"


def test_a_module_is_not_taken_for_an_alias_of_an_outer_one_whose_output_reuses_its_freed_tensors_id() -> None:
    """A block's inner output is freed before the block makes its own: Python may give the new tensor the freed one's
    id, which must not make the inner module look like it returned the block's tensor (it would not be offered)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.inner(x))
            return h * 2

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block(), Block(), Head()).eval()
    names = [p.name for p in find_points(model, torch.randn(2, 3, 16, 16))]
    assert {"1.inner", "1", "2.inner", "2"} <= set(names), names
