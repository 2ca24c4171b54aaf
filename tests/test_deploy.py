"""Deploying a patched model: ``torch.compile``, ``torch.export`` and ONNX export of an attached model give the eager
outputs (within 1e-5), and a target dispatched by accelerate (CPU offload) takes a patch like any other.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from test_patch import fresh_patch, images, make_case

from pnc_surgery import Patch

ATOL = 1e-5


@pytest.fixture(params=["timm_cnn", "hf_vit"])
def attached(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, Patch, torch.Tensor]:
    """A private target with its patch attached, an input, and (torn down) the patch detached."""
    case = make_case(request.param)
    target, patch = copy.deepcopy(case.target), fresh_patch(case)
    patch.attach(target)
    yield target, patch, images(2, 21)
    patch.detach()


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of a timm model (a tensor) or a transformers image classifier (``.logits``)."""
    out = model(x) if not hasattr(model, "config") else model(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_torch_compile_of_an_attached_model_equals_eager(attached) -> None:
    target, _, x = attached
    torch._dynamo.reset()
    with torch.no_grad():
        expected = forward(target, x)
        compiled = torch.compile(target, backend="aot_eager")  # dynamo + AOT autograd; inductor codegen is not ours
        got = forward(compiled, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_torch_compile_with_inductor_of_an_attached_model_equals_eager() -> None:
    """The default backend generates C++ code: minutes on two CPU cores, so only with ``-m slow``."""
    case = make_case("timm_cnn")
    target, patch, x = copy.deepcopy(case.target), fresh_patch(case), images(2, 21)
    torch._dynamo.reset()
    with torch.no_grad(), patch.attached(target):
        expected = target(x)
        got = torch.compile(target)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_torch_export_of_an_attached_model_equals_eager(attached) -> None:
    target, _, x = attached
    with torch.no_grad():
        expected = forward(target, x)
    kwargs = {"pixel_values": x} if hasattr(target, "config") else {}
    exported = torch.export.export(target, () if kwargs else (x,), kwargs)
    got = exported.module()(**kwargs) if kwargs else exported.module()(x)
    got = got if isinstance(got, torch.Tensor) else got.logits
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="ONNX export needs onnx and onnxscript",
)
def test_onnx_export_of_an_attached_model_equals_eager() -> None:
    """On a timm target (its output is a tensor; a transformers ``ModelOutput`` exports through the same hooks)."""
    from onnx.reference import ReferenceEvaluator

    case = make_case("timm_cnn")
    target, patch, x = copy.deepcopy(case.target), fresh_patch(case), images(2, 21)
    patch.attach(target)
    with torch.no_grad():
        expected = forward(target, x)
    program = torch.onnx.export(target, (x,), dynamo=True, verbose=False)
    patch.detach()
    evaluator = ReferenceEvaluator(program.model_proto)
    name = program.model_proto.graph.input[0].name
    (got,) = evaluator.run(None, {name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dispatch", ["cpu_offload", "dispatch_model"])
def test_a_target_dispatched_by_accelerate_takes_a_patch(dispatch: str) -> None:
    accelerate = pytest.importorskip("accelerate")
    case = make_case("timm_cnn")
    x = images(3, 22)
    with torch.no_grad(), fresh_patch(case).attached(copy.deepcopy(case.target)) as plain:
        expected = plain(x)
    target = copy.deepcopy(case.target)
    if dispatch == "cpu_offload":
        accelerate.cpu_offload(target, execution_device=torch.device("cpu"))
        assert all(p.device.type == "meta" for p in target.parameters())  # weights live in the offload hooks
    else:
        device_map = {name: "cpu" for name, _ in target.named_children()}
        accelerate.dispatch_model(target, device_map=device_map)
    patch = fresh_patch(case)
    with torch.no_grad(), patch.attached(target):
        got = target(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    with torch.no_grad():
        assert target(x).shape == (3, case.num_classes)
