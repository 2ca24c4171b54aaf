"""Specification of the Patch: a standalone safetensors module that attaches to and detaches from a target.

Patches are built by hand with :meth:`Patch.assemble` from tiny random models (timm ResNet and ViT, transformers
ViT and BERT; no training, no network). For every target family:

* while attached, the target answers with its own logits, bit-for-bit, followed by one column a cloned class (a
  tensor for timm, the same ``ModelOutput`` type with wider ``.logits`` for transformers); its ``state_dict()``
  is the same object-for-object;
* after :meth:`Patch.detach` the outputs are bit-identical (``torch.equal``) to those before attach, the sha256 of
  every parameter and buffer is unchanged and no hook is left, also after a backward pass through the patched
  model: the branch sees a detached feature, so a loss on the cloned columns reaches the patch only;
* ``save_pretrained`` / ``from_pretrained`` and ``save`` / ``load`` give a fresh patch with the same outputs;
* patches stack in attach order and detach in any order; ``attached()`` always detaches; a forward that raises
  leaves no stale state; ``model.to(torch.float64)`` after attach keeps working;
* a patch that does not fit (another architecture, a missing module, other widths, not a module) and a patch file
  that is not a patch (truncated, corrupted, missing keys, future format, pickle) are refused with a specific
  :class:`~pnc_surgery.errors.PncError` that changes nothing.

The loader fuzzing lives in ``test_patch_fuzz.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from zoo import logits_of, run_model

from pnc_surgery.backends.timm import create_model
from pnc_surgery.errors import (
    InvalidInputError,
    PatchFormatError,
    PatchMismatchError,
    PatchStateError,
    PncError,
)
from pnc_surgery.patch import FORMAT_VERSION, Patch, serialization

# ---------------------------------------------------------------------------------------------- tiny models
RESNET = {"channels": (8, 16, 32, 64), "stem_width": 8, "zero_init_last": False}
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
SOURCE_CLASSES, TARGET_CLASSES = 5, 7
VOCAB, SEQ = 100, 12


def timm_resnet(seed: int, num_classes: int = TARGET_CLASSES, name: str = "resnet18", **overrides: Any) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=num_classes, **{**RESNET, **overrides}).eval()


def timm_vit(seed: int, num_classes: int = TARGET_CLASSES) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_tiny_patch16_224", num_classes=num_classes, **VIT).eval()


def hf_vit(seed: int, num_classes: int = TARGET_CLASSES) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=num_classes,
    )
    return ViTForImageClassification(config).eval()


def hf_bert(seed: int, num_classes: int = TARGET_CLASSES, hidden: int = 32) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_classes,
    )
    return BertForSequenceClassification(config).eval()


def images(batch: int, seed: int, size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def text(batch: int, seed: int, length: int = SEQ) -> dict[str, torch.Tensor]:
    """Token ids with padding: row ``i`` has ``length - 3 * i`` real tokens (at least 2), then id 0 with mask 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        real = max(2, length - 3 * row)
        ids[row, real:] = 0
        mask[row, real:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    """A target, a hand-assembled patch for it, and inputs to run (the first is the assemble example)."""

    name: str
    source: nn.Module
    target: nn.Module
    patch: Patch
    inputs: list[Any]
    insertion: str

    @property
    def num_classes(self) -> int:
        return TARGET_CLASSES

    @property
    def new(self) -> int:
        return len(self.patch.class_ids)


CASES = ["timm_cnn", "timm_vit", "hf_vit", "hf_bert"]


_BUILT: dict[str, Case] = {}
_EXTRA_PATCHES: dict[str, Patch] = {}


def make_case(name: str) -> Case:
    """Built once per test session; tests that change a model work on a ``copy.deepcopy`` of it."""
    if name not in _BUILT:
        _BUILT[name] = _build_case(name)
    return _BUILT[name]


def _build_case(name: str) -> Case:
    if name == "timm_cnn":  # CNN -> CNN, different widths at cut (32 x 2 x 2) and insertion (16 x 4 x 4)
        source, target = timm_resnet(0, SOURCE_CLASSES), timm_resnet(1)
        inputs = [images(2, 0), images(3, 1), images(1, 2)]
        patch = Patch.assemble(
            source, target, "layer3", "layer2", [1, 3], source_input=inputs[0], target_input=inputs[0]
        )
        return Case(name, source, target, patch, inputs, "layer2")
    if name == "timm_vit":  # CNN source -> ViT target: tokens (17, 32) with a cls token -> feature map (32, 2, 2)
        source, target = timm_resnet(0, SOURCE_CLASSES), timm_vit(1)
        inputs = [images(2, 0), images(3, 1), images(1, 2)]
        patch = Patch.assemble(
            source, target, "layer3", "blocks.0", [0, 2, 4], source_input=inputs[0], target_input=inputs[0]
        )
        return Case(name, source, target, patch, inputs, "blocks.0")
    if name == "hf_vit":  # timm ViT source -> transformers ViT target
        source, target = timm_vit(0, SOURCE_CLASSES), hf_vit(1)
        inputs = [{"pixel_values": images(2, 0)}, {"pixel_values": images(3, 1)}, {"pixel_values": images(1, 2)}]
        patch = Patch.assemble(
            source,
            target,
            "blocks.0",
            "vit.layers.0",
            [1, 2],
            source_input=inputs[0]["pixel_values"],
            target_input=inputs[0],
        )
        return Case(name, source, target, patch, inputs, "vit.layers.0")
    if name == "hf_bert":  # BERT -> BERT with attention masks and padding, other batch sizes and lengths
        source, target = hf_bert(0, SOURCE_CLASSES), hf_bert(1)
        inputs = [text(2, 0), text(3, 1), text(4, 2, length=9)]
        patch = Patch.assemble(
            source,
            target,
            "bert.encoder.layer.0",
            "bert.encoder.layer.0",
            [0, 3],
            source_input=inputs[0],
            target_input=inputs[0],
        )
        return Case(name, source, target, patch, inputs, "bert.encoder.layer.0")
    raise KeyError(name)


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    return make_case(request.param)


@pytest.fixture(autouse=True)
def _detach_everything() -> Any:
    """A failing test must not leave a shared patch attached to a shared target."""
    yield
    for patch in [*(c.patch for c in _BUILT.values()), *_EXTRA_PATCHES.values()]:
        patch.detach()


# ---------------------------------------------------------------------------------------------- helpers
def sha256_of_tensors(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """dtype, shape and sha256 of the bytes of every parameter and buffer, by name."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    result = {}
    for name, tensor in named:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
        result[name] = (str(tensor.dtype), tuple(tensor.shape), digest)
    return result


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_always_called",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def hooks_in(model: nn.Module) -> dict[tuple[str, str], int]:
    """Every non-empty hook dictionary of every module: ``{(module, dict name): count}``."""
    return {
        (name, attr): len(getattr(module, attr))
        for name, module in model.named_modules()
        for attr in HOOK_DICTS
        if getattr(module, attr, None)
    }


def assert_no_hooks(model: nn.Module, insertion: str | None = None) -> None:
    assert not model._forward_hooks and not model._forward_pre_hooks
    if insertion is not None and insertion in dict(model.named_modules()):
        module = model.get_submodule(insertion)
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert hooks_in(model) == {}


def outputs(model: nn.Module, inputs: list[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [logits_of(run_model(model, x)).clone() for x in inputs]


def assert_all_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"max difference {(a.float() - b.float()).abs().max().item()}"


def new_columns(case: Case, patch: Patch | None = None, model: nn.Module | None = None) -> list[torch.Tensor]:
    """The cloned-class columns the patch adds, with only that patch attached."""
    patch, model = patch or case.patch, model or case.target
    with patch.attached(model):
        return [y[:, TARGET_CLASSES:] for y in outputs(model, case.inputs)]


def fresh_patch(case: Case) -> Patch:
    """A copy of the case's patch that no other test holds (through the file format, so nothing is shared)."""
    return serialization.rebuild(Patch, case.patch.config, case.patch.tensors(), "copy")


# ======================================================================================= attach / run / detach
def test_attached_output_is_the_target_logits_followed_by_the_new_classes(case: Case) -> None:
    target, patch = case.target, case.patch
    with torch.no_grad():
        before = [run_model(target, x) for x in case.inputs]
    returned = patch.attach(target)
    try:
        assert returned is target and patch.is_attached
        assert "attached to" in patch.summary()
        with torch.no_grad():
            after = [run_model(target, x) for x in case.inputs]
    finally:
        patch.detach()
    for old, new in zip(before, after, strict=True):
        assert type(new) is type(old)  # a tensor for timm, the same ModelOutput class for transformers
        if case.name.startswith("hf"):
            assert isinstance(new.logits, torch.Tensor) and new.logits is new[0]
        old_logits, new_logits = logits_of(old), logits_of(new)
        batch = old_logits.shape[0]
        assert old_logits.shape == (batch, case.num_classes)
        assert new_logits.shape == (batch, case.num_classes + case.new)
        assert torch.equal(new_logits[:, : case.num_classes], old_logits)
        assert torch.isfinite(new_logits).all()
    assert not patch.is_attached and "detached" in patch.summary()


def test_detach_restores_bit_identical_outputs(case: Case) -> None:
    target, patch = case.target, case.patch
    hashes, before = sha256_of_tensors(target), outputs(target, case.inputs)
    assert_no_hooks(target, case.insertion)
    patch.attach(target)
    assert target._forward_hooks and target._forward_pre_hooks
    assert target.get_submodule(case.insertion)._forward_hooks
    outputs(target, case.inputs)
    assert patch.detach() is target
    assert_no_hooks(target, case.insertion)
    assert_all_equal(outputs(target, case.inputs), before)
    assert sha256_of_tensors(target) == hashes


def test_target_state_dict_is_identical_while_attached(case: Case) -> None:
    target, patch = case.target, case.patch
    state, parameters = target.state_dict(), list(target.parameters())
    with patch.attached(target):
        outputs(target, case.inputs)
        attached = target.state_dict()
        assert list(attached) == list(state)
        for key, value in state.items():
            assert attached[key] is value or torch.equal(attached[key], value), key
        assert list(target.parameters()) == parameters  # the patch is never a submodule of the target
        assert all(m is not patch for m in target.modules())


def test_reattaching_after_detach_gives_the_same_outputs(case: Case) -> None:
    first = new_columns(case)
    assert_all_equal(new_columns(case), first)


def test_backward_through_the_new_columns_reaches_the_patch_only(case: Case) -> None:
    target = copy.deepcopy(case.target)
    patch = fresh_patch(case)
    hashes, before = sha256_of_tensors(target), outputs(target, case.inputs)
    with patch.attached(target):
        logits = logits_of(run_model(target, case.inputs[1]))
        logits[:, case.num_classes :].logsumexp(-1).sum().backward()
    # the branch sees a detached feature: nothing flows from the cloned columns into the target. (Autograd still
    # visits the target's own logits, which ``torch.cat`` puts in the same tensor, so grads may exist: all zero.)
    assert all(p.grad is None or not p.grad.any() for p in target.parameters())
    assert patch.adapter.proj.weight.grad is not None and patch.adapter.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in patch.branch.parameters())
    assert_no_hooks(target, case.insertion)
    assert_all_equal(outputs(target, case.inputs), before)
    assert sha256_of_tensors(target) == hashes


def test_backward_through_all_columns_changes_no_target_tensor(case: Case) -> None:
    target = copy.deepcopy(case.target)
    patch = fresh_patch(case)
    hashes, before = sha256_of_tensors(target), outputs(target, case.inputs)
    with patch.attached(target):
        logits = logits_of(run_model(target, case.inputs[0]))
        logits.logsumexp(-1).sum().backward()
    # the target's own columns are the target's computation, so its parameters get gradients; values stay
    assert any(p.grad is not None for p in target.parameters())
    assert patch.adapter.proj.weight.grad is not None
    assert_no_hooks(target, case.insertion)
    assert_all_equal(outputs(target, case.inputs), before)
    assert sha256_of_tensors(target) == hashes


def test_model_to_float64_after_attach_keeps_working(case: Case) -> None:
    target, patch = copy.deepcopy(case.target), fresh_patch(case)
    new32 = new_columns(case, patch, target)
    with patch.attached(target):
        patched32 = outputs(target, case.inputs)
        reference = copy.deepcopy(case.target).to(torch.float64)
        target.to(torch.float64)
        inputs64 = [_to_double(x) for x in case.inputs]
        patched64 = outputs(target, inputs64)
        expected64 = outputs(reference, inputs64)
        for got, own, new in zip(patched64, expected64, new32):
            assert got.dtype == torch.float64
            assert torch.equal(got[:, : case.num_classes], own)
            torch.testing.assert_close(got[:, case.num_classes :].float(), new, atol=1e-4, rtol=1e-4)
        assert patch.adapter.proj.weight.dtype == torch.float32  # the patch keeps its own precision
        target.to(torch.float32)
        assert_all_equal(outputs(target, case.inputs), patched32)  # float32 -> float64 -> float32 is exact
    assert_all_equal(outputs(target, case.inputs), outputs(case.target, case.inputs))


def _to_double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double()
    return {k: v.double() if v.is_floating_point() else v for k, v in x.items()}


# ---------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("name", ["timm_cnn", "hf_bert"])
def test_new_columns_are_the_source_scores_when_the_target_is_the_source(name: str) -> None:
    """Insertion = cut on a copy of the source: the identity adapter feeds the branch the source's own feature."""
    base = make_case(name)
    source = base.source
    target = copy.deepcopy(source)
    cut = base.patch.config.cut.name
    classes = base.patch.class_ids
    x = base.inputs[0]
    ungated = Patch.assemble(source, target, cut, cut, classes, source_input=x, target_input=x, gate="none")
    energy = Patch.assemble(source, target, cut, cut, classes, source_input=x, target_input=x, gate="energy")
    for inputs in base.inputs:
        with torch.no_grad():
            expected = logits_of(run_model(source, inputs))
        with ungated.attached(target):
            got = outputs(target, [inputs])[0]
        torch.testing.assert_close(got[:, SOURCE_CLASSES:], expected[:, classes], atol=1e-5, rtol=1e-4)
        # the untrained energy gate has g = 0: z = logsumexp(target logits) + log_softmax(branch logits)
        with energy.attached(target):
            got = outputs(target, [inputs])[0]
        own = got[:, :SOURCE_CLASSES]
        z = own.logsumexp(-1, keepdim=True) + expected[:, classes].log_softmax(-1)
        torch.testing.assert_close(got[:, SOURCE_CLASSES:], z, atol=1e-5, rtol=1e-4)


def test_padding_tokens_do_not_change_the_new_columns() -> None:
    case = make_case("hf_bert")
    batch = case.inputs[1]
    noisy = {**batch, "input_ids": torch.where(batch["attention_mask"].bool(), batch["input_ids"], 42)}
    with case.patch.attached(case.target):
        clean, changed = outputs(case.target, [batch, noisy])
    torch.testing.assert_close(changed, clean, atol=1e-5, rtol=1e-5)


# ======================================================================================= save / load
def test_save_pretrained_then_from_pretrained_attaches_with_the_same_outputs(case: Case, tmp_path: Path) -> None:
    expected = new_columns(case)
    folder = case.patch.save_pretrained(tmp_path / "patch")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [serialization.CONFIG_NAME, serialization.WEIGHTS_NAME, serialization.CARD_NAME]
    )
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "patch_config.json", "patch_model.safetensors"]
    loaded = Patch.from_pretrained(folder)
    assert loaded is not case.patch and not loaded.is_attached
    assert loaded.class_ids == case.patch.class_ids and loaded.class_names == case.patch.class_names
    _assert_same_tensors(loaded, case.patch)
    target_before = outputs(case.target, case.inputs)
    with loaded.attached(case.target):
        got = outputs(case.target, case.inputs)
    for y, own, new in zip(got, target_before, expected):
        assert torch.equal(y[:, : case.num_classes], own)
        assert torch.equal(y[:, case.num_classes :], new)
    assert_all_equal(outputs(case.target, case.inputs), target_before)


def test_the_hub_mixins_own_load_step_loads_the_same_patch(tmp_path: Path) -> None:
    patch = make_case("timm_cnn").patch
    folder = patch.save_pretrained(tmp_path / "patch")
    hub_options = {"revision": None, "cache_dir": None, "force_download": False, "local_files_only": False}
    loaded = Patch._from_pretrained(model_id=str(folder), token=None, proxies=None, **hub_options)
    assert loaded.class_ids == patch.class_ids and loaded.class_names == patch.class_names
    _assert_same_tensors(loaded, patch)


def test_save_then_load_single_file_attaches_with_the_same_outputs(case: Case, tmp_path: Path) -> None:
    expected = new_columns(case)
    path = case.patch.save(tmp_path / "patch.safetensors")
    assert list(tmp_path.iterdir()) == [path]
    loaded = Patch.load(path)
    assert loaded is not case.patch
    _assert_same_tensors(loaded, case.patch)
    assert loaded.config.target == case.patch.config.target
    assert_all_equal(new_columns(case, loaded), expected)


def test_the_two_file_forms_hold_the_same_patch(tmp_path: Path) -> None:
    case = make_case("timm_cnn")
    folder = case.patch.save_pretrained(tmp_path / "folder")
    single = case.patch.save(tmp_path / "single.safetensors")
    a, b = Patch.from_pretrained(folder), Patch.load(single)
    assert a.config == b.config
    _assert_same_tensors(a, b)


def _assert_same_tensors(a: Patch, b: Patch) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


# ======================================================================================= stacking
def _second_patch(name: str) -> Patch:
    """Another patch for the same target, from a different point pair (so it hooks other modules)."""
    if name in _EXTRA_PATCHES:
        return _EXTRA_PATCHES[name]
    case = make_case(name)
    x = case.inputs[0]
    if name == "timm_cnn":  # feature map 32 x 2 x 2 upsampled to the cut's 16 x 4 x 4
        patch = Patch.assemble(case.source, case.target, "layer2", "layer3", [0, 2, 4], source_input=x, target_input=x)
    else:
        patch = Patch.assemble(
            case.source,
            case.target,
            "bert.encoder.layer.1",
            "bert.encoder.layer.1",
            [4, 1, 2],
            source_input=x,
            target_input=x,
        )
    _EXTRA_PATCHES[name] = patch
    return patch


@pytest.mark.parametrize("detach_first", ["first", "second"])
@pytest.mark.parametrize("name", ["timm_cnn", "hf_bert"])
def test_stacked_patches_add_their_blocks_in_attach_order_and_detach_in_any_order(name: str, detach_first: str) -> None:
    case = make_case(name)
    first, second = case.patch, _second_patch(name)
    n, k1, k2 = case.num_classes, len(first.class_ids), len(second.class_ids)
    target, hashes, before = case.target, sha256_of_tensors(case.target), outputs(case.target, case.inputs)
    alone1, alone2 = new_columns(case, first), new_columns(case, second)

    first.attach(target)
    second.attach(target)
    for y, own, a, b in zip(outputs(target, case.inputs), before, alone1, alone2):
        assert y.shape[1] == n + k1 + k2
        assert torch.equal(y[:, :n], own)
        assert torch.equal(y[:, n : n + k1], a)
        assert torch.equal(y[:, n + k1 :], b)

    gone, kept, kept_alone = (first, second, alone2) if detach_first == "first" else (second, first, alone1)
    gone.detach()
    assert kept.is_attached and not gone.is_attached
    for y, own, cols in zip(outputs(target, case.inputs), before, kept_alone):
        assert y.shape[1] == n + len(kept.class_ids)
        assert torch.equal(y[:, :n], own)
        assert torch.equal(y[:, n:], cols)  # the remaining patch's columns are still its own
    kept.detach()
    assert_no_hooks(target, case.insertion)
    assert_all_equal(outputs(target, case.inputs), before)
    assert sha256_of_tensors(target) == hashes


def test_stacking_in_the_other_order_swaps_the_blocks() -> None:
    case = make_case("timm_cnn")
    first, second = case.patch, _second_patch("timm_cnn")
    alone1, alone2 = new_columns(case, first), new_columns(case, second)
    n, k2 = case.num_classes, len(second.class_ids)
    with second.attached(case.target), first.attached(case.target):
        for y, a, b in zip(outputs(case.target, case.inputs), alone1, alone2):
            assert torch.equal(y[:, n : n + k2], b) and torch.equal(y[:, n + k2 :], a)
    assert_no_hooks(case.target)


# ======================================================================================= lifecycle
def test_attached_context_detaches_even_when_the_block_raises() -> None:
    case = make_case("timm_cnn")
    before = outputs(case.target, case.inputs)
    with pytest.raises(KeyError, match="boom"), case.patch.attached(case.target) as model:
        assert model is case.target and case.patch.is_attached
        outputs(model, case.inputs)
        raise KeyError("boom")
    assert not case.patch.is_attached
    assert_no_hooks(case.target, case.insertion)
    assert_all_equal(outputs(case.target, case.inputs), before)


def test_a_forward_that_raises_leaves_no_stale_state() -> None:
    case = make_case("timm_cnn")
    target, patch = case.target, case.patch
    expected = [torch.cat([own, new], 1) for own, new in zip(outputs(target, case.inputs), new_columns(case))]
    with patch.attached(target):
        # fails before the insertion module: 4 channels into a 3-channel stem
        with pytest.raises(RuntimeError, match="channels"):
            target(images(2, 9, channels=4))
        assert_all_equal(outputs(target, case.inputs), expected)
        # fails in the insertion hook: a 16 x 16 image gives layer2 features of 16 x 2 x 2
        with pytest.raises(PatchMismatchError, match=r"'layer2'.*\(16, 2, 2\).*\(16, 4, 4\)"):
            target(images(2, 9, size=16))
        assert_all_equal(outputs(target, case.inputs), expected)
        # fails after the branch ran: its scores for that batch must not leak into the next forward
        calls = []

        def explode(module: nn.Module, args: Any, output: Any) -> None:
            calls.append(1)
            raise RuntimeError("after the insertion point")

        handle = target.layer4.register_forward_hook(explode)
        try:
            with pytest.raises(RuntimeError, match="after the insertion point"):
                target(images(5, 9))
        finally:
            handle.remove()
        assert calls
        assert_all_equal(outputs(target, case.inputs), expected)  # other batch sizes than the failed one
    assert_no_hooks(target, case.insertion)


def test_detach_twice_is_safe() -> None:
    case = make_case("timm_cnn")
    patch = fresh_patch(case)
    assert patch.detach() is None  # never attached
    patch.attach(case.target)
    assert patch.detach() is case.target
    assert patch.detach() is None
    assert not patch.is_attached
    assert_no_hooks(case.target, case.insertion)


def test_attaching_the_same_patch_twice_raises_patch_state_error() -> None:
    case = make_case("timm_cnn")
    target, patch = case.target, case.patch
    other = copy.deepcopy(target)
    with patch.attached(target):
        hooks = hooks_in(target)
        with pytest.raises(PatchStateError, match="already attached"):
            patch.attach(target)
        with pytest.raises(PatchStateError, match="already attached"):
            patch.attach(other)
        assert hooks_in(target) == hooks  # no second set of hooks
        assert_no_hooks(other)
        y = outputs(target, case.inputs[:1])[0]
        assert y.shape[1] == case.num_classes + case.new  # the cloned columns appear once
    assert_no_hooks(target, case.insertion)


# ======================================================================================= bad input
def _refused(patch: Patch, model: Any, error: type[Exception], match: str, **kwargs: Any) -> None:
    """``patch.attach(model)`` raises ``error`` and changes nothing: same tensors, no hooks, patch still free."""
    is_module = isinstance(model, nn.Module)
    hashes = sha256_of_tensors(model) if is_module else None
    with pytest.raises(error, match=match):
        patch.attach(model, **kwargs)
    assert not patch.is_attached
    if is_module:
        assert sha256_of_tensors(model) == hashes
        assert_no_hooks(model, patch.config.insertion.name)


def test_a_patch_for_another_architecture_is_refused() -> None:
    cnn, bert = make_case("timm_cnn"), make_case("hf_bert")
    # a ResNet patch on a ViT, a BERT patch on a ResNet and on a transformers ViT: the module is named
    _refused(cnn.patch, timm_vit(1), PatchMismatchError, r"VisionTransformer has no module 'layer2'.*ResNet")
    _refused(bert.patch, timm_resnet(1), PatchMismatchError, r"no module 'bert\.encoder\.layer\.0'")
    _refused(bert.patch, hf_vit(1), PatchMismatchError, r"no module 'bert\.encoder\.layer\.0'")
    # ResNet-34 has a layer2 of the same widths, but it is another model
    _refused(
        cnn.patch,
        timm_resnet(1, name="resnet34"),
        PatchMismatchError,
        r"another target.*resnet34.*resnet18.*strict=False",
    )
    # the patch still fits its own target afterwards
    assert new_columns(cnn)[0].shape[1] == cnn.new


def test_a_missing_insertion_module_is_named() -> None:
    case = make_case("timm_cnn")
    target = copy.deepcopy(case.target)
    del target.layer2
    _refused(case.patch, target, PatchMismatchError, r"has no module 'layer2'")


def test_a_shape_mismatch_names_the_module_and_both_shapes() -> None:
    cnn, bert = make_case("timm_cnn"), make_case("hf_bert")
    wide = timm_resnet(1, channels=(8, 24, 32, 64))
    _refused(cnn.patch, wide, PatchMismatchError, r"module 'layer2'.*\(24, 8, 3, 3\).*expects \(16, 8, 3, 3\)")
    _refused(
        cnn.patch, wide, PatchMismatchError, r"module 'layer2'", strict=False
    )  # strict=False never lets shapes through
    _refused(bert.patch, hf_bert(1, hidden=48), PatchMismatchError, r"'bert\.encoder\.layer\.0'.*48.*32")
    _refused(cnn.patch, timm_resnet(1, num_classes=9), PatchMismatchError, r"scores 9 classes.*made for 7")


def test_a_target_without_the_classifier_the_patch_reads_is_refused() -> None:
    """The gate reads the input of the target's classifier; a model without that module is refused before any hook."""
    case = make_case("timm_cnn")
    headless = copy.deepcopy(case.target)
    del headless.fc
    _refused(case.patch, headless, PatchMismatchError, r"no classifier modules \['fc'\]", strict=False)


def test_attaching_to_something_that_is_not_a_module_raises_invalid_input() -> None:
    case = make_case("timm_cnn")
    for thing in ["resnet18", None, case.target.state_dict(), lambda x: x, case.target.forward]:
        _refused(case.patch, thing, InvalidInputError, "needs a torch.nn.Module")
    assert issubclass(InvalidInputError, ValueError) and issubclass(InvalidInputError, PncError)


def test_strict_false_lets_another_target_id_through_with_a_warning_when_shapes_fit() -> None:
    cnn = make_case("timm_cnn")
    resnet34 = timm_resnet(1, name="resnet34")
    before = outputs(resnet34, cnn.inputs)
    with pytest.warns(UserWarning, match=r"another target.*resnet34"):
        cnn.patch.attach(resnet34, strict=False)
    try:
        for y, own in zip(outputs(resnet34, cnn.inputs), before):
            assert y.shape[1] == TARGET_CLASSES + cnn.new and torch.equal(y[:, :TARGET_CLASSES], own)
    finally:
        cnn.patch.detach()
    assert_all_equal(outputs(resnet34, cnn.inputs), before)

    bert = make_case("hf_bert")
    renamed = copy.deepcopy(bert.target)
    renamed.config._name_or_path = "someone/another-bert"
    _refused(bert.patch, renamed, PatchMismatchError, r"someone/another-bert")
    with pytest.warns(UserWarning, match="someone/another-bert"), bert.patch.attached(renamed, strict=False):
        assert outputs(renamed, bert.inputs[:1])[0].shape[1] == TARGET_CLASSES + bert.new
    assert_no_hooks(renamed, bert.insertion)


# ======================================================================================= bad files
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The timm CNN patch in both forms (tests copy before they change anything)."""
    root = tmp_path_factory.mktemp("saved")
    patch = make_case("timm_cnn").patch
    return {"single": patch.save(root / "patch.safetensors"), "folder": patch.save_pretrained(root / "folder")}


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def assert_format_error(load: Any, path: Path, label: str, match: str = "") -> None:
    """``load(path)`` raises :class:`PatchFormatError` (whose message matches ``match``); other errors propagate."""
    try:
        load(path)
    except PatchFormatError as exc:
        assert re.search(match, str(exc)), f"{label}: {exc}"
        return
    pytest.fail(f"{label}: loaded without a PatchFormatError")


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def test_a_truncated_safetensors_file_is_a_format_error(saved: dict[str, Path], tmp_path: Path) -> None:
    data = saved["single"].read_bytes()
    header = _header_length(data)
    for size in [0, 3, 8, 8 + header // 2, 8 + header, len(data) - 1]:
        path = tmp_path / f"cut{size}.safetensors"
        path.write_bytes(data[:size])
        assert_format_error(Patch.load, path, f"{size} bytes", match=re.escape(path.name))
    folder = _copy_folder(saved["folder"], tmp_path / "folder")
    weights = folder / serialization.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_format_error(
        Patch.from_pretrained, folder, "truncated weights in a folder", match=serialization.WEIGHTS_NAME
    )


def test_corrupted_bytes_are_a_format_error(saved: dict[str, Path], tmp_path: Path) -> None:
    data = saved["single"].read_bytes()
    header = _header_length(data)
    corruptions = {
        "huge header length": struct.pack("<Q", 2**60) + data[8:],
        "header length past the end": struct.pack("<Q", len(data)) + data[8:],
        "header not json": data[:8] + b"#" + data[9:],
        "header not an object": data[:8] + b"[" + b" " * (header - 2) + b"]" + data[8 + header :],
        "random bytes": bytes(range(256)) * 10,
        "zeros": b"\0" * 1000,
    }
    text = data[8 : 8 + header].decode()
    first_offsets = text.index('"data_offsets":[') + len('"data_offsets":[')
    corruptions["offsets past the data"] = data[: 8 + first_offsets] + b"9" + data[8 + first_offsets + 1 :]
    corruptions["dtype unknown"] = data.replace(b'"dtype":"F32"', b'"dtype":"Q32"', 1)
    for label, corrupted in corruptions.items():
        path = tmp_path / "corrupt.safetensors"
        path.write_bytes(corrupted)
        assert_format_error(Patch.load, path, label)


def test_a_config_with_missing_keys_is_a_format_error(saved: dict[str, Path], tmp_path: Path) -> None:
    for i, key in enumerate(
        ("format_version", "source", "cut", "target", "insertion", "classes", "adapter", "gate", "branch")
    ):
        folder = _copy_folder(saved["folder"], tmp_path / f"missing{i}")
        config = json.loads((folder / serialization.CONFIG_NAME).read_text())
        del config[key]
        (folder / serialization.CONFIG_NAME).write_text(json.dumps(config))
        with pytest.raises(PatchFormatError, match=rf"missing keys \['{key}'\]"):
            Patch.from_pretrained(folder)
    # a config that is JSON but not an object, or not JSON at all
    for i, body in enumerate(["[1, 2]", "{not json", "", "\xff\xfe"]):
        folder = _copy_folder(saved["folder"], tmp_path / f"bad{i}")
        (folder / serialization.CONFIG_NAME).write_text(body, encoding="latin-1")
        with pytest.raises(PatchFormatError):
            Patch.from_pretrained(folder)
    # nested sections the rebuild needs
    for i, (section, key) in enumerate(
        [("adapter", "insertion"), ("branch", "cut"), ("source", "architecture"), ("gate", "kind")]
    ):
        folder = _copy_folder(saved["folder"], tmp_path / f"nested{i}")
        config = json.loads((folder / serialization.CONFIG_NAME).read_text())
        del config[section][key]
        (folder / serialization.CONFIG_NAME).write_text(json.dumps(config))
        with pytest.raises(PatchFormatError):
            Patch.from_pretrained(folder)


def test_a_future_format_version_is_a_format_error(saved: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy_folder(saved["folder"], tmp_path / "future")
    config = json.loads((folder / serialization.CONFIG_NAME).read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (folder / serialization.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(PatchFormatError, match="newer than this pnc_surgery understands"):
        Patch.from_pretrained(folder)
    for bad in [0, -1, "1", 1.0, True, None]:
        config["format_version"] = bad
        (folder / serialization.CONFIG_NAME).write_text(json.dumps(config))
        with pytest.raises(PatchFormatError, match="format_version"):
            Patch.from_pretrained(folder)
    # the single-file form keeps the same check on its embedded config
    tensors, metadata = serialization.read_tensors(saved["single"])
    embedded = json.loads(metadata[serialization.METADATA_KEY])
    embedded["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.safetensors"
    save_file(tensors, path, {**metadata, serialization.METADATA_KEY: json.dumps(embedded)})
    with pytest.raises(PatchFormatError, match="newer"):
        Patch.load(path)
    save_file(tensors, path, {"format": "pt"})  # no config at all: a plain safetensors file
    with pytest.raises(PatchFormatError, match=serialization.METADATA_KEY):
        Patch.load(path)


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    marker: Path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickle_files_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    case = make_case("timm_cnn")
    marker = tmp_path / "code-ran"
    payload = _Payload()
    payload.marker = marker
    evil = pickle.dumps({"weights": payload})
    torch.save(case.patch.state_dict(), tmp_path / "plain.bin")
    (tmp_path / "evil.bin").write_bytes(evil)
    (tmp_path / "evil.pt").write_bytes(evil)
    (tmp_path / "evil.safetensors").write_bytes(evil)
    for name in ["plain.bin", "evil.bin", "evil.pt", "evil.safetensors"]:
        with pytest.raises(PatchFormatError):
            Patch.load(tmp_path / name)
    with pytest.raises(PatchFormatError, match="pickle"):
        Patch.load(tmp_path / "plain.bin")
    folder = case.patch.save_pretrained(tmp_path / "folder")
    (folder / serialization.WEIGHTS_NAME).write_bytes(evil)
    with pytest.raises(PatchFormatError):
        Patch.from_pretrained(folder)
    assert not marker.exists()
    pickle.loads(evil)  # the payload is live: the loader, not the payload, is what kept it from running
    assert marker.exists()


def test_tensors_that_do_not_fit_the_config_are_a_format_error(saved: dict[str, Path], tmp_path: Path) -> None:
    tensors, metadata = serialization.read_tensors(saved["single"])
    path = tmp_path / "p.safetensors"
    missing = dict(tensors)
    missing.pop("adapter.proj.weight")
    extra = {**tensors, "branch.model.extra": torch.zeros(3)}
    wrong = {**tensors, "adapter.proj.weight": torch.zeros(3, 3, 1, 1)}
    pruned = {**tensors, "gate.weight": tensors["gate.weight"][:-1]}
    for label, changed, match in [
        ("missing", missing, "missing"),
        ("extra", extra, "unexpected"),
        ("wrong", wrong, "adapter.proj.weight"),
        ("gate", pruned, "gate.weight"),
    ]:
        save_file(changed, path, metadata)
        assert_format_error(Patch.load, path, label, match=match)


def test_config_fields_of_the_wrong_type_are_a_format_error(saved: dict[str, Path], tmp_path: Path) -> None:
    """What attach reads from the config is checked at load time, not met as a KeyError or TypeError at attach."""
    edits = {
        "parameter_shapes is a list": ("target", "parameter_shapes", [[16, 8, 3, 3]]),
        "a parameter shape is a number": ("target", "parameter_shapes", {"0.conv1.weight": 16}),
        "a classifier is not a name": ("target", "classifiers", [{"name": "fc"}]),
        "num_classes is text": ("target", "num_classes", "7"),
        "num_classes is zero": ("target", "num_classes", 0),
        "the insertion has no name": ("insertion", "name", None),
        "the target id is a number": ("target", "id", 3),
        "the insertion type is missing": ("target", "insertion_type", KeyError),
        "the target class is missing": ("target", "class", KeyError),
    }
    for i, (label, (section, key, value)) in enumerate(edits.items()):
        folder = _copy_folder(saved["folder"], tmp_path / f"typed{i}")
        config = json.loads((folder / serialization.CONFIG_NAME).read_text())
        if value is KeyError:
            del config[section][key]
        else:
            config[section][key] = value
        (folder / serialization.CONFIG_NAME).write_text(json.dumps(config))
        assert_format_error(Patch.from_pretrained, folder, label, match=rf"{section}\.{key}")


def test_a_text_branch_whose_recorded_lengths_disagree_is_a_format_error(tmp_path: Path) -> None:
    """The load-time self-test runs the branch with padding, so the attention mask's length is checked too."""
    case = make_case("hf_bert")
    tensors, metadata = case.patch.tensors(), {"format": "pt"}
    config = case.patch.config.to_dict()
    config["branch"]["stubs"]["bert.embeddings"]["shape"][0] += 2
    path = tmp_path / "bert.safetensors"
    save_file(tensors, path, {**metadata, serialization.METADATA_KEY: json.dumps(config)})
    assert_format_error(Patch.load, path, "stub length")


def test_every_load_error_is_a_pnc_error() -> None:
    for error in (PatchFormatError, PatchMismatchError, PatchStateError, InvalidInputError):
        assert issubclass(error, PncError)


def test_an_attached_patch_never_adopts_the_target(case: Case) -> None:
    """The target is not a submodule of the patch: its parameters and state_dict stay the patch's own."""
    patch, target = case.patch, case.target
    own = patch.num_parameters
    keys = set(patch.state_dict())
    with patch.attached(target):
        assert patch.num_parameters == own
        assert set(patch.state_dict()) == keys
        assert not any(module is target for module in patch.modules())
