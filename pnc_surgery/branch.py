"""The source tail: a model that runs from the feature at a cut point to the logits.

The tail reuses the model's own ``forward()``, so every functional step after the cut (cls token and
position embedding, pooling in ``forward_head``, attention masks, distilled heads) is exactly the model's.
The cut module is replaced by a *feed* that returns the given feature, and every module that finished
before the cut by a *stub* that returns a tensor of its recorded shape without computing anything. Stubbed
modules keep their attributes (models read e.g. ``embeddings.patch_embeddings.projection.weight.dtype``)
but their parameters shrink to empty placeholders, so the tail holds only the weights after the cut.
A stub returns zeros, or (where the rest of the model reads an input-independent value such as rotary
tables) the value it recorded.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .backends import Backend, ModelInputs, backend_for
from .backends.base import call_model, main_tensor
from .errors import InvalidInputError, UnsupportedModelError
from .points import Point, eval_mode, resolve_example_input, trace_model

__all__ = ["SourceTail", "capture_features", "STUB_VALUE_BUFFER"]

STUB_VALUE_BUFFER = "pnc_stub_value"
EXACT_ATOL = 1e-5


class _LiveFeature:
    """The feature of the current tail call, shared by the feed and the stubs (not a module: never saved)."""

    def __init__(self, cut_shape: Sequence[int]) -> None:
        self.cut_shape = tuple(cut_shape)
        self.feature: torch.Tensor | None = None

    def shape_like(self, recorded: Sequence[int]) -> tuple[int, ...]:
        """``recorded`` (batch excluded) with the batch, and dims shared with the cut, taken from the live feature."""
        live = self.feature
        assert live is not None, "stub called outside a tail forward"
        dims = [
            live.shape[i + 1] if i < len(self.cut_shape) and size == self.cut_shape[i] else size
            for i, size in enumerate(recorded)
        ]
        return (live.shape[0], *dims)


class _Feed:
    """Replacement ``forward`` of the cut module: return the live feature."""

    def __init__(self, live: _LiveFeature) -> None:
        self.live = live

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert self.live.feature is not None, "feed called outside a tail forward"
        return self.live.feature


class _Stub:
    """Replacement ``forward`` of a module that finished before the cut: zeros, or its recorded value."""

    def __init__(self, module: nn.Module, shape: Sequence[int], dtype: torch.dtype, live: _LiveFeature) -> None:
        self.module, self.shape, self.dtype, self.live = module, tuple(shape), dtype, live

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        feature = self.live.feature
        shape = self.live.shape_like(self.shape)
        value = self.module._buffers.get(STUB_VALUE_BUFFER)
        if value is not None:
            return value.to(feature.device).expand(shape)
        dtype = feature.dtype if self.dtype.is_floating_point else self.dtype
        return torch.zeros((), dtype=dtype, device=feature.device).expand(shape)


def _shrink(module: nn.Module, keep: set[int]) -> None:
    """Replace every parameter and buffer under ``module`` by an empty tensor of the same dtype (unless shared)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and id(param) not in keep:
                sub._parameters[name] = nn.Parameter(param.new_empty(0), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and id(buffer) not in keep and name != STUB_VALUE_BUFFER:
                sub._buffers[name] = buffer.new_empty(0)


def capture_features(
    model: nn.Module, names: Sequence[str], example_input: ModelInputs | None = None
) -> dict[str, torch.Tensor]:
    """The outputs of the named modules on one eval-mode forward (cloned, first call of each)."""
    backend = backend_for(model)
    inputs = resolve_example_input(model, example_input, backend)
    wanted = set(names)
    missing = wanted - {name for name, _ in model.named_modules()}
    if missing:
        raise InvalidInputError(f"{type(model).__name__} has no modules named {sorted(missing)}")
    with eval_mode(model):
        trace = trace_model(model, inputs, backend, keep=wanted.__contains__)
    features = {name: trace.calls[name].output for name in names if name in trace.calls}
    silent = [name for name in names if features.get(name) is None]
    if silent:
        raise UnsupportedModelError(f"modules {silent} did not produce a single tensor on this input")
    return features


class SourceTail(nn.Module):
    """A copy of a classifier that computes its logits from the feature at ``point``.

    Args:
        model: the classifier to cut (not modified; the tail holds a deep copy).
        point: where to cut (from :func:`~pnc_surgery.find_points`), or a module name.
        example_input: an input to record shapes on (built from the model's config when omitted).
        verify: check that the tail reproduces the model's logits on the example (atol 1e-5).

    Call it as ``tail(feature, **context)``, where ``context`` holds the model's other keyword inputs that
    matter after the cut (e.g. ``attention_mask`` for text models).
    """

    def __init__(
        self,
        model: nn.Module,
        point: Point | str,
        example_input: ModelInputs | None = None,
        *,
        verify: bool = True,
    ) -> None:
        super().__init__()
        backend = backend_for(model)
        inputs = resolve_example_input(model, example_input, backend)
        name = point.name if isinstance(point, Point) else str(point)
        modules = dict(model.named_modules())
        if name not in modules or not name:
            raise InvalidInputError(f"{type(model).__name__} has no module {name!r} to cut at")
        self.model = copy.deepcopy(model).eval()
        self.cut = name
        self.backend_family = backend.family
        self.main_input_name = backend.main_input_name(model)
        self.context_keys = tuple(k for k in inputs if k != self.main_input_name) if isinstance(inputs, Mapping) else ()
        main = main_tensor(inputs, self.main_input_name)
        self.input_shape = tuple(main.shape[1:])
        self.input_dtype = main.dtype

        with eval_mode(model):
            trace = trace_model(model, inputs, backend, keep=lambda n: True)
        cut_call = trace.calls.get(name)
        if cut_call is None or cut_call.output is None:
            raise UnsupportedModelError(f"module {name!r} was not called with a single tensor output; it cannot be cut")
        self.cut_shape = tuple(cut_call.output.shape[1:])
        self.live = _LiveFeature(self.cut_shape)
        self.stubs: dict[str, tuple[int, ...]] = {}
        self._install(trace, name)
        if verify:
            self._verify(cut_call.output, trace.logits, inputs)

    def _install(self, trace: Any, cut: str) -> None:
        """Feed at the cut; stubs on the outermost modules that finished before it."""
        before = trace.completed_before(cut)
        copied = dict(self.model.named_modules())
        ancestors = {cut.rsplit(".", i)[0] for i in range(cut.count(".") + 1)}
        replaced: list[str] = []
        for name, module in copied.items():
            if not name or any(name.startswith(r + ".") for r in replaced):
                continue
            call = trace.calls.get(name)
            if name == cut:
                module.forward = _Feed(self.live)
            elif call is not None and name not in ancestors and before(call) and call.output is not None:
                module.forward = _Stub(module, call.output.shape[1:], call.output.dtype, self.live)
                self.stubs[name] = tuple(call.output.shape[1:])
                module.__dict__["_pnc_recorded"] = call.output[:1]
            else:
                continue
            replaced.append(name)
        kept = {id(p) for n, m in copied.items() if not any(n == r or n.startswith(r + ".") for r in replaced) for p in m.parameters(recurse=False)}
        for name in replaced:
            _shrink(copied[name], kept)

    def _verify(self, feature: torch.Tensor, expected: torch.Tensor, inputs: ModelInputs) -> None:
        """Make stubs exact: keep recorded values only where the rest of the model reads them."""
        context = {k: inputs[k] for k in self.context_keys} if self.context_keys else {}

        def exact() -> bool:
            with torch.no_grad():
                return torch.allclose(self(feature, **context), expected, atol=EXACT_ATOL, rtol=1e-4)

        if exact():
            self._forget_recordings()
            return
        stubbed = [self.model.get_submodule(name) for name in self.stubs]
        for module in stubbed:
            module.register_buffer(STUB_VALUE_BUFFER, module.__dict__["_pnc_recorded"])
        if not exact():
            raise UnsupportedModelError(
                f"the tail of {type(self.model).__name__} from {self.cut!r} does not reproduce the model's logits; "
                "this point cannot be cut"
            )
        for module in stubbed:
            value = module._buffers.pop(STUB_VALUE_BUFFER)
            if not exact():
                module.register_buffer(STUB_VALUE_BUFFER, value)
        self._forget_recordings()

    def _forget_recordings(self) -> None:
        for name in self.stubs:
            self.model.get_submodule(name).__dict__.pop("_pnc_recorded", None)

    def train(self, mode: bool = True) -> "SourceTail":
        """The tail always runs in eval mode (frozen norms, no dropout); gradients still flow."""
        super().train(mode)
        self.model.eval()
        return self

    def dummy_input(self, feature: torch.Tensor) -> torch.Tensor:
        """A stand-in for the model's data input: only its shape is read before the stubs take over."""
        self.live.feature = feature
        shape = self.live.shape_like(self.input_shape) if self.input_dtype.is_floating_point is False else (
            feature.shape[0],
            *self.input_shape,
        )
        dtype = feature.dtype if self.input_dtype.is_floating_point else self.input_dtype
        return torch.zeros((), dtype=dtype, device=feature.device).expand(shape)

    def forward(self, feature: torch.Tensor, **context: torch.Tensor) -> torch.Tensor:
        """Logits of the model for inputs whose feature at the cut is ``feature``."""
        try:
            dummy = self.dummy_input(feature)
            inputs: ModelInputs = {self.main_input_name: dummy, **context} if self.backend_family == "transformers" else dummy
            return backend_for(self.model).logits(call_model(self.model, inputs))
        finally:
            self.live.feature = None
