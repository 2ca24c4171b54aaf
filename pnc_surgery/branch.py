"""The branch (the cloned source tail): a model that runs from the feature at a cut point to the logits.

The branch reuses the model's own ``forward()``, so every functional step after the cut (cls token and
position embedding, pooling in ``forward_head``, attention masks, distilled heads) is exactly the model's.
The cut module is replaced by a *feed* that returns the given feature, and every module that finished
before the cut by a *stub* that returns a tensor of its recorded shape without computing anything, except the
modules the branch still computes from the token ids (:attr:`~pnc_surgery.Point.live`: an encoder whose output
a decoder cut also needs) and position tables that do not lead with the batch. Stubbed
modules keep their attributes (models read e.g. ``embeddings.patch_embeddings.projection.weight.dtype``)
but their parameters shrink to empty placeholders, so the branch holds only the weights after the cut.
A stub returns zeros, or (where the rest of the model reads an input-independent value such as rotary
tables) the value it recorded.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .backends import Backend, ModelInputs, backend_for, backend_named
from .backends.base import call_model, logits_of, main_tensor
from .errors import InvalidInputError, PatchMismatchError, UnsupportedModelError
from .points import Point, cut_inputs, resolve_example_input
from .tracing import classifier_names, eval_mode, trace_model

if TYPE_CHECKING:
    from .patch.config import BranchSpec

__all__ = ["Branch", "capture_features", "STUB_VALUE_BUFFER"]

STUB_VALUE_BUFFER = "pnc_stub_value"
OVERRIDABLE_ATTRIBUTES = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "normalized_shape",
    "num_heads",
    "hidden_features",
    "attn_dim",
)
EXACT_ATOL = 1e-5


def _useful_taps(size: int, kernel: int, padding: int, stride: int, dilation: int) -> tuple[int, int] | None:
    """The first and last kernel taps that meet the input anywhere along one axis of ``size``, when the others
    (which meet only zero padding) can be dropped symmetrically; ``None`` when every tap is needed."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    low = max(0, -(((out - 1) * stride - padding) // dilation))  # the first tap that reaches row 0 of the input
    high = min(kernel - 1, (padding + size - 1) // dilation)  # the last that reaches its last row
    symmetric = low + high == kernel - 1 and low * dilation <= padding
    return (low, high) if out > 0 and low > 0 and symmetric else None


class _CroppedKernelConv2d(nn.Conv2d):
    """A convolution that skips the kernel taps which only ever meet zero padding.

    A CNN's deep stages at 16-64 px run 3x3-7x7 kernels over 1x1-2x2 maps, where all but the centre taps read
    padding, and oneDNN computes them all anyway (a 7x7 depthwise convolution over 1x1 maps took 30x the time of
    its centre tap, forward and backward, on a CPU). The outputs are the same and the dropped taps get the zero
    gradient they would get; the stored weight keeps its whole kernel, so files and shapes do not change.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.jit.is_tracing() or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)  # a trace would keep this input size's crop for all
        axes = list(zip(input.shape[-2:], self.kernel_size, self.padding, self.stride, self.dilation))
        taps = [_useful_taps(int(size), k, p, s, d) for size, k, p, s, d in axes]
        if taps == [None, None]:
            return super()._conv_forward(input, weight, bias)
        (rows, row_pad), (cols, col_pad) = (
            (slice(t[0], t[1] + 1), p - t[0] * d) if t is not None else (slice(None), p)
            for t, (_, _, p, _, d) in zip(taps, axes)
        )
        return nn.functional.conv2d(
            input, weight[:, :, rows, cols], bias, self.stride, (row_pad, col_pad), self.dilation, self.groups
        )


def _crop_kernels(model: nn.Module) -> None:
    """Let every plain ``nn.Conv2d`` of ``model`` (a branch's own copy) skip the taps that meet only padding."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = _CroppedKernelConv2d


class _LiveFeature(threading.local):
    """The feature of the current tail call, shared by the feed and the stubs (per thread: concurrent calls of one
    tail each see their own; not a module: never saved)."""

    def __init__(self, cut_shape: Sequence[int]) -> None:
        self.cut_shape = tuple(cut_shape)
        self.feature: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> _LiveFeature:
        return _LiveFeature(self.cut_shape)

    def __reduce__(self) -> tuple:
        return (_LiveFeature, (self.cut_shape,))

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
    """Replacement ``forward`` of the cut module: return the live feature, packed with the recorded ``extras``
    where the module returned a tuple (an extra the module passed on from its arguments, ``{"argument": key}``, is
    taken from this call's arguments)."""

    def __init__(self, live: _LiveFeature, extras: tuple | None) -> None:
        self.live, self.extras = live, extras

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple:
        assert self.live.feature is not None, "feed called outside a tail forward"
        if self.extras is None:
            return self.live.feature
        return (self.live.feature, *(_extra(item, args, kwargs) for item in self.extras))


def _extra(recorded: Any, args: tuple, kwargs: dict) -> Any:
    """One extra element of the feed's output: the argument it names, or the recorded constant."""
    if isinstance(recorded, Mapping):
        key = recorded["argument"]
        if isinstance(key, int):
            return args[key] if key < len(args) else None
        return kwargs.get(key)
    return _as_tuples(recorded)


def _constant(value: Any) -> Any:
    """A tuple output's extra element as a JSON constant: numbers and nested tuples as they are, anything else (an
    attention map, a cache) as ``None`` (the tail's exactness check proves the rest of the model does not read it)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (tuple, list)):
        return [_constant(item) for item in value]
    return None


def _as_tuples(value: Any) -> Any:
    """A recorded extra as the model returned it: lists (JSON's sequences) become tuples."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list) else value


def _text_ids(model: nn.Module, backend: Backend, inputs: ModelInputs, ids: torch.Tensor) -> dict[str, int | None]:
    """The token ids a text tail's stand-in input is made of: ``pad`` under the mask, ``eos`` at each text's end
    where every text of the example ends with it, ``filler`` elsewhere. A tail that finds its pooled position
    from the ids (the last non-pad token, the last eos) then finds the one the model found."""
    special = backend.special_token_ids(model)
    vocab = backend.vocab_size(model) or int(ids.max()) + 1
    filler = next((i for i in range(int(vocab)) if i not in special), 0)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    last = _last_attended(mask if isinstance(mask, torch.Tensor) else torch.ones_like(ids))
    eos = backend.eos_token_id(model)
    ends = eos is not None and bool((ids.gather(1, last[:, None]) == eos).all())
    return {"filler": filler, "pad": backend.pad_token_id(model), "eos": eos if ends else None}


def _last_attended(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last position under the attention mask (left or right padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * (mask != 0)).argmax(dim=1)


class _Stub:
    """Replacement ``forward`` of a module that finished before the cut: zeros, or its recorded value."""

    def __init__(self, module: nn.Module, shape: Sequence[int], dtype: torch.dtype, live: _LiveFeature) -> None:
        self.module, self.shape, self.dtype, self.live = module, tuple(int(s) for s in shape), dtype, live

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        feature = self.live.feature
        assert feature is not None, "stub called outside a tail forward"
        shape = self.live.shape_like(self.shape)
        value = self.module._buffers.get(STUB_VALUE_BUFFER)
        if value is not None:  # materialised: the model may write into it in place (``x += shortcut``)
            return value.to(feature.device).expand(shape).clone()
        dtype = feature.dtype if self.dtype.is_floating_point else self.dtype
        return torch.zeros(shape, dtype=dtype, device=feature.device)


def _within(name: str, roots: Sequence[str]) -> bool:
    """Whether module ``name`` is one of ``roots`` or inside one."""
    return any(name == root or name.startswith(root + ".") for root in roots)


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
        raise UnsupportedModelError(f"modules {silent} did not produce a tensor (or a tuple leading with one) here")
    return {name: feature for name, feature in features.items() if feature is not None}


class Branch(nn.Module):
    """A copy of a classifier that computes its logits from the feature at a cut point.

    Build it with :meth:`from_model` (from a live model) or :meth:`from_spec` (from a patch file, without
    any source weights). Call it as ``branch(feature, **context)``, where ``context`` holds the model's other
    keyword inputs that matter after the cut (``attention_mask`` for text models, and the token ids themselves
    where the rest of the model reads them: :attr:`~pnc_surgery.Point.reads_input`). Other keywords are ignored.

    Args:
        model: the model to turn into a tail, modified in place (pass a copy).
        spec: what :meth:`spec` records (a :class:`~pnc_surgery.patch.config.BranchSpec`): cut name and shape,
            stubs, data-input facts.
    """

    def __init__(self, model: nn.Module, spec: BranchSpec) -> None:
        super().__init__()
        self.model = model.eval()
        self.recorded = spec
        self.family = str(spec.family)
        self.backend = backend_named(self.family)
        self.cut = spec.cut
        self.cut_shape = tuple(spec.cut_shape)
        self.cut_extras = None if spec.cut_extras is None else tuple(spec.cut_extras)
        self.main_input_name = spec.main_input_name
        self.context_keys = tuple(spec.context_keys)
        self.input_shape = tuple(spec.input_shape)
        self.input_dtype = getattr(torch, spec.input_dtype)
        self.text_ids = None if spec.text_ids is None else dict(spec.text_ids)
        self.stubs: dict[str, dict] = {str(k): dict(v) for k, v in spec.stubs.items()}
        self.classifiers = list(spec.classifiers)
        self.classes = list(spec.classes)
        self.overrides: dict[str, dict] = {}
        self.live = _LiveFeature(self.cut_shape)
        self._install()
        _crop_kernels(self.model)
        for name, attrs in spec.overrides.items():
            for attr, value in attrs.items():
                self.set_attribute(name, attr, value)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        point: Point | str,
        example_input: ModelInputs | None = None,
        *,
        verify: bool = True,
    ) -> Branch:
        """Cut ``model`` (left unchanged; the tail holds a deep copy) at ``point``.

        Args:
            model: the classifier.
            point: where to cut (from :func:`~pnc_surgery.find_points`), or a module name.
            example_input: an input to record shapes on (built from the model's config when omitted).
            verify: check that ``point`` is a cut (the substitution test of :mod:`pnc_surgery.points`) and that
                the tail reproduces the model's logits on the example (atol 1e-5).
        """
        backend = backend_for(model)
        inputs = resolve_example_input(model, example_input, backend)
        name = point.name if isinstance(point, Point) else str(point)
        if not name or name not in dict(model.named_modules()):
            raise InvalidInputError(f"{type(model).__name__} has no module {name!r} to cut at")
        if verify:
            reads_input, live = cut_inputs(model, name, inputs)
        elif isinstance(point, Point):
            reads_input, live = point.reads_input, point.live
        else:
            reads_input, live = False, ()
        with eval_mode(model):
            trace = trace_model(model, inputs, backend, keep=lambda n: True)
        cut_call = trace.calls.get(name)
        if cut_call is None or cut_call.output is None:
            raise UnsupportedModelError(
                f"module {name!r} was not called with a tensor output (or a tuple that leads with one): not a cut"
            )
        main_name = backend.main_input_name(model)
        main = main_tensor(inputs, main_name)
        before = trace.completed_before(name)
        ancestors = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
        batch = int(trace.logits.shape[0])
        stubs: dict[str, dict[str, Any]] = {}
        recorded: dict[str, torch.Tensor] = {}
        for module_name, _ in model.named_modules():
            call = trace.calls.get(module_name)
            if (
                module_name
                and module_name not in ancestors
                and not any(module_name.startswith(s + ".") for s in stubs)
                and not module_name.startswith(name + ".")
                and not _within(module_name, live)
                and call is not None
                and call.output is not None
                and not call.packed
                and call.output.shape[0] in (1, batch)  # (L, L, heads) position tables compute from the positions
                and before(call)
            ):
                stubs[module_name] = {
                    "shape": list(call.output.shape[1:]),
                    "dtype": str(call.output.dtype).removeprefix("torch."),
                    "stored": False,
                }
                recorded[module_name] = call.output[:1]
        from .patch.config import BranchSpec  # the patch package imports this module

        spec = BranchSpec(
            family=backend.family,  # type: ignore[arg-type]  # "torch" too: such a branch works but is not saved
            cut=name,
            cut_shape=tuple(cut_call.output.shape[1:]),
            cut_extras=(
                tuple(
                    _constant(item) if key is None else {"argument": key}
                    for item, key in zip(cut_call.extras, cut_call.passed_on)
                )
                if cut_call.packed
                else None
            ),
            main_input_name=main_name,
            context_keys=(
                tuple(k for k in inputs if k != main_name or reads_input) if isinstance(inputs, Mapping) else ()
            ),
            input_shape=tuple(main.shape[1:]),
            input_dtype=str(main.dtype).removeprefix("torch."),
            text_ids=None if main.is_floating_point() else _text_ids(model, backend, inputs, main),
            stubs=stubs,
            classifiers=tuple(classifier_names(trace, int(trace.logits.shape[-1]), after=cut_call.post)),
            classes=tuple(range(int(trace.logits.shape[-1]))),
        )
        tail = cls(copy.deepcopy(model), spec)
        if verify:
            context = {k: inputs[k] for k in tail.context_keys} if isinstance(inputs, Mapping) else {}
            tail._make_exact(cut_call.output, trace.logits, context, recorded)
        return tail

    @classmethod
    def from_spec(cls, spec: BranchSpec | Mapping[str, Any], architecture: Mapping[str, Any]) -> Branch:
        """Rebuild a tail's structure from its spec (a :class:`BranchSpec` or its dict, checked) and the source
        architecture (tensors still to be loaded)."""
        if isinstance(spec, Mapping):
            from .patch.config import BranchSpec  # the patch package imports this module

            spec = BranchSpec.from_dict(spec)
        model = backend_named(str(architecture.get("family"))).build(architecture)
        tail = cls(model, spec)
        for name, stub in tail.stubs.items():
            if stub.get("stored"):
                dtype = getattr(torch, str(stub["dtype"]))
                tail.model.get_submodule(name).register_buffer(
                    STUB_VALUE_BUFFER, torch.empty(1, *stub["shape"], dtype=dtype, device="meta")
                )
        return tail

    def spec(self) -> dict:
        """JSON description that, with the source architecture, rebuilds this tail's structure (a
        :class:`BranchSpec`'s dict, with what pruning and class selection changed)."""
        return replace(
            self.recorded,
            stubs=self.stubs,
            classifiers=tuple(self.classifiers),
            classes=tuple(self.classes),
            overrides=self.overrides,
        ).to_dict()

    def set_attribute(self, module_name: str, attr: str, value: Any) -> None:
        """Set a shape attribute of a module (``out_features`` after pruning, ...) and record it for rebuilding."""
        if attr not in OVERRIDABLE_ATTRIBUTES:
            raise UnsupportedModelError(f"attribute {attr!r} cannot be recorded; allowed: {OVERRIDABLE_ATTRIBUTES}")
        if not isinstance(value, (int, list, tuple)) or isinstance(value, bool):
            raise UnsupportedModelError(
                f"override {module_name}.{attr} must be an int or a list of ints, got {value!r}"
            )
        module = self.model.get_submodule(module_name)
        setattr(module, attr, tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value))
        self.overrides.setdefault(module_name, {})[attr] = (
            list(value) if isinstance(value, (list, tuple)) else int(value)
        )

    def keep_classes(self, classes: Sequence[int]) -> None:
        """Keep only the classifier rows of ``classes`` (source class ids, in output order)."""
        if not self.classifiers:
            raise UnsupportedModelError(f"no classifier layer was found in {type(self.model).__name__}'s tail")
        rows = [self.classes.index(int(c)) for c in classes]
        index = torch.tensor(rows, dtype=torch.long)
        for name in self.classifiers:
            module = self.model.get_submodule(name)
            assert isinstance(module, (nn.Linear, nn.Conv2d)), "classifier_names keeps linear and conv layers only"
            module.weight = nn.Parameter(module.weight.detach().index_select(0, index.to(module.weight.device)))
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().index_select(0, index.to(module.bias.device)))
            self.set_attribute(name, "out_features" if isinstance(module, nn.Linear) else "out_channels", len(rows))
        self.classes = [int(c) for c in classes]

    def _install(self) -> None:
        """Feed at the cut; stubs on the listed modules; their tensors shrink to placeholders."""
        modules = dict(self.model.named_modules())
        missing = [n for n in [self.cut, *self.stubs] if n not in modules]
        if missing:
            raise UnsupportedModelError(f"the source model has no modules {missing}")
        modules[self.cut].forward = _Feed(self.live, self.cut_extras)
        for name, stub in self.stubs.items():
            modules[name].forward = _Stub(modules[name], stub["shape"], getattr(torch, stub["dtype"]), self.live)
        replaced = [self.cut, *self.stubs]
        kept = {
            id(p)
            for n, m in modules.items()
            if not _within(n, replaced)
            for p in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        }
        for name in replaced:
            _shrink(modules[name], kept)

    def _make_exact(
        self, feature: torch.Tensor, expected: torch.Tensor, context: dict, recorded: dict[str, torch.Tensor]
    ) -> None:
        """Keep recorded stub values only where the rest of the model reads them (rotary tables, ...)."""

        def exact() -> bool:
            with torch.no_grad():
                return torch.allclose(self(feature, **context), expected, atol=EXACT_ATOL, rtol=1e-4)

        if exact():
            return
        for name, value in recorded.items():
            self.model.get_submodule(name).register_buffer(STUB_VALUE_BUFFER, value)
            self.stubs[name]["stored"] = True
        if not exact():
            raise UnsupportedModelError(
                f"the tail of {type(self.model).__name__} from {self.cut!r} does not reproduce the model's logits; "
                "this point cannot be cut"
            )
        for name in recorded:
            module = self.model.get_submodule(name)
            stored = module._buffers.pop(STUB_VALUE_BUFFER)
            self.stubs[name]["stored"] = False
            if not exact():
                module.register_buffer(STUB_VALUE_BUFFER, stored)
                self.stubs[name]["stored"] = True

    def train(self, mode: bool = True) -> Branch:
        """The tail always runs in eval mode (frozen norms, no dropout); gradients still flow."""
        super().train(mode)
        self.model.eval()
        return self

    def _dummy_input(self, feature: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """A stand-in for the model's data input: only its shape is read before the stubs take over, and for text
        the positions of pad and eos tokens (see :func:`_text_ids`)."""
        if self.input_dtype.is_floating_point:
            return torch.zeros((), dtype=feature.dtype, device=feature.device).expand(
                feature.shape[0], *self.input_shape
            )
        shape = self.live.shape_like(self.input_shape)
        if self.text_ids is None or len(shape) != 2:
            return torch.zeros((), dtype=self.input_dtype, device=feature.device).expand(shape)
        if mask is None or tuple(mask.shape) != shape:
            mask = torch.ones(shape, dtype=torch.long, device=feature.device)
        filler = self.text_ids["filler"]
        assert filler is not None, "BranchSpec always records a filler id"
        ids = torch.full(shape, filler, dtype=self.input_dtype, device=feature.device)
        if self.text_ids["pad"] is not None:
            ids = ids.masked_fill(mask == 0, self.text_ids["pad"])
        if self.text_ids["eos"] is not None:
            at_end = torch.arange(shape[1], device=feature.device) == _last_attended(mask)[:, None]
            ids = ids.masked_fill(at_end, self.text_ids["eos"])
        return ids

    @property
    def reads_input(self) -> bool:
        """Whether the tail reads the model's token ids besides the feature (pass them in the context; without
        them it runs on stand-in ids, which only fits the shapes)."""
        return self.main_input_name in self.context_keys

    def forward(self, feature: torch.Tensor, **context: torch.Tensor) -> torch.Tensor:
        """Logits of the model for inputs whose feature at the cut is ``feature``."""
        if tuple(feature.shape[1:]) != self.cut_shape and self.input_dtype.is_floating_point:
            raise PatchMismatchError(
                f"the branch at {self.cut!r} expects features of shape {self.cut_shape}, got {tuple(feature.shape[1:])}"
            )
        self.live.feature = feature
        context = {k: v for k, v in context.items() if k in self.context_keys}
        given = context.pop(self.main_input_name, None)
        try:
            dummy = self._dummy_input(feature, context.get("attention_mask")) if given is None else given
            inputs = self.backend.call_inputs(self.model, dummy)
            if context:
                assert isinstance(inputs, Mapping), "context tensors only come with keyword inputs"
                inputs = {**inputs, **context}
            return logits_of(call_model(self.model, inputs))
        finally:
            self.live.feature = None
