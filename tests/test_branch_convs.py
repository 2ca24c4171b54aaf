"""A branch's convolutions skip the kernel taps that meet only zero padding.

A CNN's deep stages at 16-64 px run 3x3-7x7 kernels over 1x1-2x2 maps; the branch runs such a convolution on the
taps that meet the input only, with the plain convolution's outputs and gradients, and keeps the whole kernel in
its weights and files.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pnc_surgery.backends.timm import create_model
from pnc_surgery.branch import Branch, _CroppedKernelConv2d

CASES = [
    (size, kernel, stride, dilation, groups, padding)
    for size, kernel, stride, dilation, groups in itertools.product([1, 2, 3, 8], [1, 3, 7], [1, 2], [1, 2], [1, 8])
    for padding in sorted({0, kernel // 2, dilation * (kernel // 2)})
    if (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 >= 1
]


@pytest.mark.parametrize(("size", "kernel", "stride", "dilation", "groups", "padding"), CASES)
def test_a_cropped_convolution_answers_and_learns_as_the_plain_one(size, kernel, stride, dilation, groups, padding):
    torch.manual_seed(0)
    shape = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    plain = nn.Conv2d(8, 8, kernel, **shape)
    cropped = _CroppedKernelConv2d(8, 8, kernel, **shape)
    cropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, size, size + 1)
    inputs = [x.clone().requires_grad_(True), x.clone().requires_grad_(True)]
    outputs = [plain(inputs[0]), cropped(inputs[1])]
    for output in outputs:
        output.square().sum().backward()
    assert outputs[0].shape == outputs[1].shape
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cropped.weight.grad, plain.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, atol=1e-4, rtol=1e-4)


def _convnext_branch() -> tuple[nn.Module, Branch]:
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=5).eval()
    return model, Branch.from_model(model, "stages.3.downsample", torch.randn(2, 3, 32, 32))


@pytest.fixture
def kernels(monkeypatch) -> list[tuple[int, ...]]:
    """The weight shape of every 2-D convolution run while the test runs."""
    shapes: list[tuple[int, ...]] = []
    real = nn.functional.conv2d
    monkeypatch.setattr(
        nn.functional, "conv2d", lambda x, w, *a, **k: shapes.append(tuple(w.shape)) or real(x, w, *a, **k)
    )
    return shapes


def test_a_branch_runs_its_7x7_convolutions_over_1x1_maps_on_the_centre_tap(kernels):
    model, branch = _convnext_branch()
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d)), "the source is untouched"
    depthwise = branch.model.stages[3].blocks[0].conv_dw
    assert isinstance(depthwise, _CroppedKernelConv2d) and depthwise.weight.shape[-2:] == (7, 7)
    feature = torch.randn(2, *branch.cut_shape)
    assert feature.shape[-2:] == (1, 1), "convnext_atto's last stage at 32 px works on 1x1 maps"
    kernels.clear()  # building the branch ran the (plain) source
    with torch.no_grad():
        branch(feature)
    assert (depthwise.out_channels, 1, 1, 1) in kernels and (depthwise.out_channels, 1, 7, 7) not in kernels
    assert branch.state_dict()["model.stages.3.blocks.0.conv_dw.weight"].shape[-2:] == (7, 7), "files keep it"


def test_a_traced_branch_keeps_whole_kernels(kernels):
    """A trace would keep one input size's crop for every size: it records the plain convolution."""
    _, branch = _convnext_branch()
    branch.requires_grad_(False)
    kernels.clear()  # building the branch ran the (plain) source
    torch.jit.trace(branch, torch.randn(2, *branch.cut_shape), check_trace=False)
    assert (branch.model.stages[3].blocks[0].conv_dw.out_channels, 1, 7, 7) in kernels
