"""Specification of where ``clone()`` runs and what it is told in the user's terms (issue 15, items 1 and 4).

* ``CloneConfig(precision="bfloat16")`` runs extraction and training under autocast; the patch's tensors stay
  float32 and finite, and it still adds the cloned classes.
* ``classes=`` takes the source's label names as well as ids; an unknown name is refused with the names it knows.
* A target dispatched by accelerate (CPU offload, disk offload, a device map with modules on disk; weights on the meta
  device in between forwards) is cloned into as the same target undispatched: the same fingerprint, weights sample
  included, and the same outputs attached; detached it answers exactly as before.
* On a GPU (tests marked ``cuda``, skipped without one): models on CUDA clone with data given on the CPU, and a source
  on the CPU clones into a target on CUDA.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pnc_surgery import CloneConfig, InvalidInputError, clone
from pnc_surgery.backends.timm import create_model

TINY = CloneConfig(max_cuts=1, max_insertions=1, search_steps=2, train_steps=6, keep_ratio=0.5)


def _model(num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet18", num_classes=num_classes, in_chans=1, channels=(8, 8, 16, 16)).eval()


def _data(count: int = 16, classes: int = 2) -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(1, 16, 16, generator=generator), i % classes) for i in range(count)]


def test_a_bfloat16_clone_gives_a_finite_float32_patch():
    source, target = _model(4, 0), _model(5, 1)
    patch = clone(
        source, target, _data(), config=CloneConfig(**{**TINY.__dict__, "precision": "bfloat16"}), progress=False
    )
    assert all(
        t.dtype == torch.float32 and torch.isfinite(t).all() for t in patch.tensors().values() if t.is_floating_point()
    )
    with patch.attached(target), torch.no_grad():
        assert target(torch.randn(2, 1, 16, 16)).shape == (2, 5 + 2)


def test_an_unknown_precision_is_refused():
    with pytest.raises(InvalidInputError, match="precision"):
        CloneConfig(precision="int8")


def _named_source() -> torch.nn.Module:
    source = _model(4, 0)
    source.pretrained_cfg = {**source.pretrained_cfg, "label_names": ["ant", "bee", "cat", "dog"]}
    return source


def test_classes_may_be_named_by_the_sources_label_names():
    source, target = _named_source(), _model(5, 1)
    data = [(x, y + 1) for x, y in _data()]  # bee and cat
    by_name = clone(source, target, data, classes=["cat", "bee"], config=TINY, progress=False)
    by_id = clone(source, target, data, classes=[2, 1], config=TINY, progress=False)
    assert by_name.class_ids == by_id.class_ids == [2, 1]
    assert all(torch.equal(by_name.tensors()[k], v) for k, v in by_id.tensors().items())


def test_an_unknown_label_name_is_refused_with_the_names_the_source_knows():
    with pytest.raises(InvalidInputError, match=r"'cow' is not a label name.*ant"):
        clone(_named_source(), _model(5, 1), _data(), classes=["cow"], config=TINY, progress=False)


def test_label_names_need_a_source_that_has_them():
    with pytest.raises(InvalidInputError, match="no label names"):
        clone(_model(4, 0), _model(5, 1), _data(), classes=["cat"], config=TINY, progress=False)


def _dispatch(model: torch.nn.Module, how: str, folder: Path) -> None:
    accelerate = pytest.importorskip("accelerate")
    cpu = torch.device("cpu")
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=cpu)
    elif how == "disk_offload":
        accelerate.disk_offload(model, str(folder), execution_device=cpu)
    else:
        device_map = {name: "disk" if name in ("layer2", "layer3") else "cpu" for name, _ in model.named_children()}
        accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(folder), main_device="cpu")
    assert any(p.device.type == "meta" for p in model.parameters())  # weights live in the offload hooks


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "dispatch_model"])
def test_a_clone_into_a_target_dispatched_by_accelerate_is_the_clone_into_the_plain_target(how, tmp_path):
    source, target = _model(4, 0), _model(5, 1)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    plain_patch = clone(source, target, _data(), config=TINY, progress=False)
    with torch.no_grad(), plain_patch.attached(target):
        expected = target(x)
    dispatched = copy.deepcopy(target)
    _dispatch(dispatched, how, tmp_path)
    with torch.no_grad():
        before = dispatched(x)

    patch = clone(source, dispatched, _data(), config=TINY, progress=False)

    assert patch.config.target == plain_patch.config.target  # the weights sample is read from the offload hooks
    with torch.no_grad(), patch.attached(dispatched):
        got = dispatched(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(dispatched(x), before)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
def test_models_on_cuda_clone_from_data_on_the_cpu():
    source, target = _model(4, 0).cuda(), _model(5, 1).cuda()
    patch = clone(source, target, _data(), replay=[(x,) for x, _ in _data(8)], config=TINY, progress=False)
    with patch.attached(target), torch.no_grad():
        out = target(torch.randn(2, 1, 16, 16, device="cuda"))
    assert out.shape == (2, 7) and out.is_cuda


@cuda
@pytest.mark.cuda
def test_a_source_on_the_cpu_clones_into_a_target_on_cuda():
    source, target = _model(4, 0), _model(5, 1).cuda()
    patch = clone(source, target, _data(), config=TINY, progress=False)
    with patch.attached(target), torch.no_grad():
        assert target(torch.randn(2, 1, 16, 16, device="cuda")).shape == (2, 7)


@cuda
@pytest.mark.cuda
def test_text_models_on_cuda_clone_with_a_branch_that_reads_the_ids():
    """Token ids drawn for the cut test and given to a branch cut in BART's encoder live on the models' device."""
    from zoo import build, tiny_bart

    source, (target, _) = tiny_bart().cuda(), build("hf_distilbert")
    target = target.cuda()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (24, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1::2, 8:], ids[1::2, 8:] = 0, 0
    ids[torch.arange(24), mask.sum(1) - 1] = 1  # eos
    data = [({"input_ids": ids[i], "attention_mask": mask[i]}, i % 2) for i in range(24)]
    config = CloneConfig(**{**TINY.__dict__, "cut": "model.encoder.layers.1"})
    patch = clone(source, target, data, config=config, progress=False)
    assert patch.branch.reads_input
    with patch.attached(target), torch.no_grad():
        out = target(input_ids=ids[:4].cuda(), attention_mask=mask[:4].cuda()).logits
    assert out.shape == (4, 9) and out.is_cuda
