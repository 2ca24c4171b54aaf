"""Find where a classifier can be cut: ordered :class:`Point` s on its main path.

A point is a module whose output alone determines the model's answer: feed any input, swap that module's
output for the one it produced on another input, and the model answers as for the other input. Block and
stage outputs pass this test; a conv inside a residual block, attention, or a norm inside a block do not.
Candidates come from the module tree (stages, blocks, embeddings: children of ``Sequential``/``ModuleList``
containers and the top levels), and each one is kept only if it passes the substitution test on one example
forward. The test compares the classifier's input (pre-logits) as well as the logits, since random-init
heads give near-constant logits. A module that returns a tuple leading with a tensor (transformers layers
returning ``(hidden, attention)``, patch embeddings returning ``(tokens, height, width)``) is a point when that
tensor alone passes the test: only it is swapped, and only it is the point's feature.

Token models get a second chance: in an encoder-decoder classifier (BART, mBART, PEGASUS) the decoder reads the
token ids itself, so no encoder layer determines the answer alone, yet the encoder layer and the ids do. A
candidate that fails the test above is a point that *reads the input* when the answer stays the first input's
while every module that finished before it answers as on the second input (see
:func:`_input_reading_errors`); a branch cut there takes the token ids as an input besides the feature.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .backends import Backend, ModelInputs, backend_for
from .backends.base import call_model, main_tensor
from .errors import InvalidInputError, UnsupportedModelError
from .tracing import ModuleCall, Trace, classifier_names, eval_mode, main_output, trace_model, with_main_output

__all__ = [
    "Point",
    "check_cut",
    "find_points",
    "resolve_example_input",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("NCHW", "NHWC", "NLC")
SUBSTITUTION_RTOL = 1e-4
SUBSTITUTION_CHUNK = 16
"""At most this many candidates share one forward of the substitution test."""
SUBSTITUTION_ELEMENTS = 2**23
"""And no more than fit this many elements in their largest feature: large batches run slower per row on CPU."""
DEAD_WEIGHT = 1e-4
"""Weight tensors no larger than this (zero-init norms, layer scales) are woken up in the substitution probe."""
WAKE_VALUES = (1.0, 0.1, 0.01)
"""What the probe sets dead weights to: one, or less where one makes the answers overflow (deep attention stacks)."""


@dataclass(frozen=True)
class Point:
    """A place where a model can be cut (as a source) or tapped (as a target).

    Attributes:
        name: the module's ``named_modules()`` path; the point is that module's output.
        index: position in execution order among the model's points.
        shape: output shape without the batch dimension.
        layout: ``"NCHW"``, ``"NHWC"`` (spatial maps) or ``"NLC"`` (token sequences).
        reduction: input size divided by the feature's spatial size (or the patch size of tokens); ``None`` for text.
        width: channels or hidden size.
        reads_input: the rest of the model also reads the token ids (the decoder of an encoder-decoder model):
            a branch cut here takes them as an input.
    """

    name: str
    index: int
    shape: tuple[int, ...]
    layout: str
    reduction: int | None
    width: int
    reads_input: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> Point:
        try:
            point = cls(
                name=str(data["name"]),
                index=int(data["index"]),
                shape=tuple(int(s) for s in data["shape"]),
                layout=str(data["layout"]),
                reduction=None if data.get("reduction") is None else int(data["reduction"]),
                width=int(data["width"]),
                reads_input=bool(data.get("reads_input", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"not a valid point description {data!r}: {exc}") from None
        if point.layout not in LAYOUTS:
            raise InvalidInputError(f"point {point.name!r} has unknown layout {point.layout!r}")
        return point

    @property
    def grid(self) -> tuple[int, int] | None:
        """Spatial size (H, W) of a feature map, ``None`` for tokens."""
        if self.layout == "NCHW":
            return self.shape[1], self.shape[2]
        if self.layout == "NHWC":
            return self.shape[0], self.shape[1]
        return None


def resolve_example_input(model: nn.Module, example_input: ModelInputs | None, backend: Backend) -> ModelInputs:
    """The given example input after cheap checks, or one built from the model's own config."""
    if example_input is None:
        return backend.example_input(model)
    inputs = backend.call_inputs(model, example_input)
    backend.check_input(model, inputs)
    return inputs


def _candidate_names(model: nn.Module) -> set[str]:
    """Structural candidates: top levels, container items, and composite children of container items."""
    modules = dict(model.named_modules())
    names = set()
    for name, module in modules.items():
        if not name:
            continue
        parent_name = name.rpartition(".")[0]
        parent = modules[parent_name]
        grand = modules.get(parent_name.rpartition(".")[0]) if parent_name else None
        containers = (nn.Sequential, nn.ModuleList)
        if (
            name.count(".") <= 1
            or isinstance(parent, containers)
            or (isinstance(grand, containers) and any(True for _ in module.children()))
        ):
            names.add(name)
    return names


CHANNELS_FIRST_MODULES = (
    nn.Conv2d,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
"""torch's 2-d layers: their output is NCHW whatever the sizes."""


def _layout(shape: tuple[int, ...], spatial: tuple[int, int] | None, hint: str | None) -> str | None:
    if len(shape) == 2:
        return "NLC"
    if len(shape) != 3:
        return None
    if spatial is None:
        return "NCHW"
    height, width = spatial

    def fits(h: int, w: int) -> bool:
        return h > 0 and w > 0 and height % h == 0 and width % w == 0 and height // h == width // w

    chw, hwc = fits(shape[1], shape[2]), fits(shape[0], shape[1])
    if chw and hwc:
        return hint if hint in ("NCHW", "NHWC") else "NCHW"
    if hwc:
        return "NHWC"
    return "NCHW"


def _describe(
    name: str,
    index: int,
    shape: tuple[int, ...],
    layout: str,
    spatial: tuple[int, int] | None,
    prefix: int | None,
    reads_input: bool,
) -> Point:
    if layout == "NCHW":
        width, grid_h = shape[0], shape[1]
    elif layout == "NHWC":
        width, grid_h = shape[2], shape[0]
    else:
        width, grid_h = shape[1], None
    reduction = None
    if spatial is not None and grid_h:
        reduction = spatial[0] // grid_h if spatial[0] % grid_h == 0 else None
    elif spatial is not None and layout == "NLC":
        tokens = shape[0]
        for lead in dict.fromkeys([*([prefix] if prefix is not None else []), *range(9)]):
            side = math.isqrt(max(tokens - lead, 0))
            if side and side * side == tokens - lead and spatial[0] % side == 0:
                reduction = spatial[0] // side
                break
    return Point(
        name=name,
        index=index,
        shape=tuple(shape),
        layout=layout,
        reduction=reduction,
        width=int(width),
        reads_input=reads_input,
    )


def _without_dead_paths(model: nn.Module, value: float) -> nn.Module:
    """A copy whose all-but-zero weights are set to ``value``, or ``model`` itself when it has none.

    Random-init models often zero a residual branch's last norm or start its layer scale at 1e-5 or 1e-6
    (timm's ``zero_init_last``, ``init_values``); that branch then contributes (almost) nothing and a module on
    the skip path would pass the substitution test without being a cut. Changing weights cannot make a cut
    stop being one (it is a property of the graph), so the probe may wake these paths up.
    """
    dead = [
        name
        for name, param in model.named_parameters()
        if param.dim() >= 1
        and param.numel() > 1
        and not name.endswith("bias")
        and param.is_floating_point()
        and param.device.type != "meta"  # weights offloaded by accelerate: not in the model to read
        and param.detach().abs().max().item() <= DEAD_WEIGHT
    ]
    if not dead:
        return model
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name in dead:
            twin.get_parameter(name).fill_(value)
    return twin


def _repeat_batch(inputs: ModelInputs, times: int) -> ModelInputs:
    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat(times, *([1] * (tensor.dim() - 1)))

    if isinstance(inputs, torch.Tensor):
        return repeat(inputs)
    return {key: repeat(value) for key, value in inputs.items()}


def _chunks(names: list[str], features: list[torch.Tensor | None]) -> Iterator[list[str]]:
    """``names`` in chunks that share one forward: at most ``SUBSTITUTION_CHUNK`` candidates and, for large
    features, only as many as keep the largest one under ``SUBSTITUTION_ELEMENTS`` elements (large batches run
    slower per row on CPU)."""
    largest = max((f.numel() for f in features if f is not None), default=1)
    size = max(1, min(SUBSTITUTION_CHUNK, SUBSTITUTION_ELEMENTS // largest))
    for start in range(0, len(names), size):
        yield names[start : start + size]


def _swapped_rows(output: Any, rows: Sequence[slice], value: torch.Tensor) -> Any:
    """``output`` with each of ``rows`` of its feature (see :func:`main_output`) replaced by ``value``."""
    feature, _ = main_output(output)
    assert feature is not None, "only modules with a feature are swapped"
    swapped = feature.clone()
    for part in rows:
        swapped[part] = value
    return with_main_output(output, swapped)


def _substitution_errors(
    model: nn.Module,
    first: Trace,
    names: list[str],
    second_inputs: ModelInputs,
    baseline: torch.Tensor,
    spread: float,
    backend: Backend,
) -> dict[str, float]:
    """How far the model's answer stays from the first input's when only ``name``'s output is swapped for the
    first input's, relative to how far the two inputs' answers differ (0 for a cut).

    Candidates are tested together: the second input is repeated once per candidate along the batch and
    candidate ``i``'s hook swaps only its own rows, so one forward tests a whole chunk (rows are
    independent in eval mode).
    """
    batch = baseline.shape[0]
    errors: dict[str, float] = {}
    for chunk in _chunks(names, [first.calls[n].output for n in names]):
        handles = []
        try:
            for i, name in enumerate(chunk):
                rows, recorded = slice(i * batch, (i + 1) * batch), first.calls[name].output
                assert recorded is not None, f"{name} was traced without its output"
                handles.append(
                    model.get_submodule(name).register_forward_hook(
                        lambda m, a, out, rows=rows, recorded=recorded: _swapped_rows(out, [rows], recorded)
                    )
                )
            trace = trace_model(model, _repeat_batch(second_inputs, len(chunk)), backend, classifiers=first.classifiers)
        finally:
            for handle in handles:
                handle.remove()
        answers = _compare_outputs(trace)
        for i, name in enumerate(chunk):
            errors[name] = (answers[i * batch : (i + 1) * batch] - baseline).abs().max().item() / spread
    return errors


@dataclass
class _Calls:
    """Every call of every module on one forward: when it started and ended, whether it returned a plain tensor
    (what a branch stubs), (for the modules asked for) its feature, and when the last call that was given integer
    tensors (token ids, as an embedding is) started."""

    steps: dict[str, list[tuple[int, int]]]
    plain: dict[str, bool]
    outputs: dict[str, list[torch.Tensor | None]]
    last_id_read: int = -1


def _record_calls(model: nn.Module, inputs: ModelInputs, keep: Collection[str] = ()) -> _Calls:
    record = _Calls(steps={}, plain={}, outputs={})
    counter = iter(range(10**9))
    started: dict[str, list[int]] = {}
    handles = []

    def on_pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            step = next(counter)
            started.setdefault(name, []).append(step)
            if any(_holds_ids(a) for a in [*args, *kwargs.values()]):
                record.last_id_read = step

        return hook

    def on_post(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            record.steps.setdefault(name, []).append((started[name].pop(), next(counter)))
            feature, packed = main_output(output)
            record.plain[name] = feature is not None and not packed
            if name in keep:
                record.outputs.setdefault(name, []).append(None if feature is None else feature.detach().clone())

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(on_pre(name), with_kwargs=True))
                handles.append(module.register_forward_hook(on_post(name)))
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return record


def _holds_ids(value: Any) -> bool:
    """Whether ``value`` looks like token ids: an integer tensor that is not a 0/1 mask."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() > 0
        and value.numel() > 0
        and not value.is_floating_point()
        and value.dtype != torch.bool
        and value.device.type != "meta"
        and bool(value.max() > 1)
    )


def _finished_before(calls: _Calls, name: str) -> list[str] | None:
    """The outermost modules returning a plain tensor (as a branch stubs them) whose calls all ended before
    ``name`` started, or ``None`` when one of them is called again after it started (a branch stubs every call)."""
    start = calls.steps[name][0][0]
    before = []
    for module_name, steps in calls.steps.items():
        if steps[0][1] < start and not (name == module_name or name.startswith(module_name + ".")):
            if steps[-1][1] >= start:
                return None
            before.append(module_name)
    stubbed: list[str] = []
    for module_name in sorted(before, key=lambda n: n.count(".")):
        if calls.plain[module_name] and not any(module_name.startswith(s + ".") for s in stubbed):
            stubbed.append(module_name)
    return stubbed


def _input_reading_errors(
    model: nn.Module,
    first: Trace,
    names: list[str],
    inputs: ModelInputs,
    second_inputs: ModelInputs,
    baseline: torch.Tensor,
    spread: float,
    backend: Backend,
) -> dict[str, float]:
    """How far the answer on the *first* input moves when every module that finished before ``name`` started
    answers as on the second input and ``name`` keeps its own output, relative to the inputs' difference.

    0 means the rest of the model depends on ``name``'s output and on the input itself, not on anything computed
    before ``name``: a cut for a branch that is given the input (token ids) besides the feature. Modules are
    replaced as a branch stubs them (the outermost ones, all their calls); a module whose output does not lead with
    the batch is left alone where both inputs give it the same value (position tables) and fails the candidate
    otherwise. A candidate after which no module is given integer tensors (token ids, as the decoder's embedding is)
    fails without a forward: nothing after it could read the ids. Candidates share forwards as in
    :func:`_substitution_errors`.
    """
    calls = _record_calls(model, inputs)
    names = [name for name in names if calls.steps[name][0][0] < calls.last_id_read]
    if not names:
        return {}
    replaced = {name: _finished_before(calls, name) for name in names}
    errors = {name: math.inf for name, stubs in replaced.items() if stubs is None}
    swapped = sorted({s for stubs in replaced.values() if stubs is not None for s in stubs})
    mine = _record_calls(model, inputs, set(swapped)).outputs
    theirs = _record_calls(model, second_inputs, set(swapped)).outputs
    batch = baseline.shape[0]
    tested = [name for name in names if name not in errors]
    for chunk in _chunks(tested, [first.calls[n].output for n in tested]):
        rows_of = {name: slice(i * batch, (i + 1) * batch) for i, name in enumerate(chunk)}
        failed: set[str] = set()
        handles = []

        def swap(module_name: str, users: list[str], rows_of: dict[str, slice], failed: set[str]) -> Callable:
            count = iter(range(10**9))
            rows = batch * len(rows_of)

            def hook(module: nn.Module, args: Any, output: Any) -> Any:
                k = next(count)
                feature, _ = main_output(output)
                value, own = theirs[module_name][k], mine[module_name][k]
                if feature is None or value is None or own is None:
                    failed.update(users)
                    return None
                if feature.shape[:1] != (rows,) or own.shape[:1] != (batch,):
                    if own.shape != value.shape or not torch.equal(own, value):
                        failed.update(users)
                    return None
                return _swapped_rows(output, [rows_of[user] for user in users], value)

            return hook

        try:
            for module_name in swapped:
                users = [n for n in chunk if module_name in (replaced[n] or ())]
                if users:
                    swapper = swap(module_name, users, rows_of, failed)
                    handles.append(model.get_submodule(module_name).register_forward_hook(swapper))
            for name in chunk:
                recorded = first.calls[name].output
                assert recorded is not None, f"{name} was traced without its output"
                handles.append(
                    model.get_submodule(name).register_forward_hook(
                        lambda m, a, out, rows=rows_of[name], recorded=recorded: _swapped_rows(out, [rows], recorded)
                    )
                )
            trace = trace_model(model, _repeat_batch(inputs, len(chunk)), backend, classifiers=first.classifiers)
        except (RuntimeError, ValueError, IndexError) as exc:  # the model cannot run on the swapped values
            logger.debug("input-reading test of %s failed to run: %s", chunk, exc)
            errors.update(dict.fromkeys(chunk, math.inf))
            continue
        finally:
            for handle in handles:
                handle.remove()
        answers = _compare_outputs(trace)
        for name in chunk:
            error = (answers[rows_of[name]] - baseline).abs().max().item() / spread
            errors[name] = math.inf if name in failed else error
    return errors


def _compare_outputs(trace: Trace) -> torch.Tensor:
    parts = [trace.logits.flatten(1).float()]
    if trace.pre_logits is not None:
        parts.append(trace.pre_logits.flatten(1).float())
    return torch.cat(parts, dim=1)


def _checked_reference(
    model: nn.Module, inputs: ModelInputs, backend: Backend, keep: Callable[[str], bool]
) -> tuple[Trace, int]:
    """One traced forward on the example, checked to be a classifier's (batch, classes) logits."""
    try:
        reference = trace_model(model, inputs, backend, keep=keep)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        shape = tuple(main_tensor(inputs, backend.main_input_name(model)).shape)
        raise InvalidInputError(f"{type(model).__name__} failed on an example input of shape {shape}: {exc}") from None
    batch = main_tensor(inputs, backend.main_input_name(model)).shape[0]
    if reference.logits.dim() != 2 or reference.logits.shape[0] != batch:
        raise UnsupportedModelError(
            f"{type(model).__name__} returns {tuple(reference.logits.shape)}, not (batch, classes) logits: "
            "it has no classifier head to clone from or into"
        )
    num_classes = backend.num_classes(model)
    if num_classes is None:
        num_classes = int(reference.logits.shape[1])
    if num_classes == 0 or reference.logits.shape[1] != num_classes:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no classifier head (num_classes={num_classes}, output "
            f"{tuple(reference.logits.shape)})"
        )
    return reference, num_classes


def _substitution_errors_of(
    model: nn.Module, inputs: ModelInputs, backend: Backend, names: list[str], classifiers: list[str]
) -> dict[str, tuple[float, bool]]:
    """Each of ``names``' relative error in the substitution test (on a twin without dead residual paths), and
    whether it passes only as a point that reads the input (token models); a name passes when its error is at
    most ``SUBSTITUTION_RTOL``."""
    second_inputs = backend.second_input(model, inputs)
    wanted = set(names)
    for value in WAKE_VALUES:
        probe = _without_dead_paths(model, value)
        first = trace_model(probe, inputs, backend, keep=wanted.__contains__, classifiers=classifiers)
        baseline = _compare_outputs(first)
        other = _compare_outputs(trace_model(probe, second_inputs, backend, classifiers=classifiers))
        spread = (other - baseline).abs().max().item()
        if math.isfinite(spread) or probe is model:
            break
    if not math.isfinite(spread):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s answers are not finite (NaN or inf) on the example and a second input; "
            "cut points cannot be tested"
        )
    if spread <= 1e-7 * max(1.0, baseline.abs().max().item()):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s output does not depend on its input here (difference {spread:.3g}); "
            "cut points cannot be told apart"
        )
    present = [n for n in names if first.calls.get(n) is not None and first.calls[n].output is not None]
    errors = {
        name: (error, False)
        for name, error in _substitution_errors(probe, first, present, second_inputs, baseline, spread, backend).items()
    }
    failed = [name for name, (error, _) in errors.items() if not error <= SUBSTITUTION_RTOL]
    reads_ids = (
        isinstance(inputs, Mapping) and not main_tensor(inputs, backend.main_input_name(model)).is_floating_point()
    )
    if failed and reads_ids:  # a branch can be given keyword token ids, not a positional tensor
        reading = _input_reading_errors(probe, first, failed, inputs, second_inputs, baseline, spread, backend)
        errors.update({name: (error, True) for name, error in reading.items() if error <= SUBSTITUTION_RTOL})
    return errors


def check_cut(model: nn.Module, name: str, inputs: ModelInputs) -> bool:
    """Raise :class:`UnsupportedModelError` unless the rest of ``model`` depends on module ``name``'s output alone,
    or (token models) on it and the token ids.

    Returns:
        Whether the rest of the model also reads the token ids (:attr:`Point.reads_input`).
    """
    backend = backend_for(model)
    inputs = resolve_example_input(model, inputs, backend)
    with eval_mode(model):
        reference, num_classes = _checked_reference(model, inputs, backend, keep=lambda n: n == name)
        call = reference.calls.get(name)
        if call is None or call.output is None or call.calls != 1:
            raise UnsupportedModelError(
                f"module {name!r} is not called exactly once with a tensor output (or a tuple that leads with one); "
                "it cannot be cut"
            )
        if call.output.shape[0] != reference.logits.shape[0]:
            raise UnsupportedModelError(
                f"module {name!r} outputs {tuple(call.output.shape)}, whose first axis is not the batch "
                "(windows, heads?); it is not a cut point"
            )
        classifiers = classifier_names(reference, num_classes, after=call.post)
        error, reads_input = _substitution_errors_of(model, inputs, backend, [name], classifiers).get(
            name, (math.inf, False)
        )
        if not error <= SUBSTITUTION_RTOL:
            raise UnsupportedModelError(f"{name!r} is not a cut point of {type(model).__name__}: {_not_a_cut(error)}")
    return reads_input


def _not_a_cut(error: float) -> str:
    if not math.isfinite(error):
        return "its output was not produced on the second input"
    return (
        f"swapping its output alone leaves the answer {error:.2g} of the inputs' difference away (the model also "
        "reads around it: a residual path, attention context, a second branch)"
    )


def _shape_verdict(call: ModuleCall, batch: int) -> str | None:
    """Why a called module's output cannot be a point whatever the substitution test says (``None``: it can)."""
    out = call.output
    if call.calls != 1:
        return f"called {call.calls} times (a shared module is not one place in the model)"
    if out is None:
        return "its output is neither a tensor nor a tuple that leads with one"
    if out.dim() == 0 or out.shape[0] != batch:
        return f"its output {tuple(out.shape)} does not lead with the batch (windows, heads?)"
    if out.dim() not in (3, 4):
        return (
            f"its output {tuple(out.shape)} is neither a (B, C, H, W) / (B, H, W, C) map nor a (B, L, C) sequence"
            + (" (flat (B, C) features, as in an MLP, are not supported as points)" if out.dim() == 2 else "")
        )
    return None


def find_points(model: nn.Module, example_input: ModelInputs | None = None, explain: bool = False) -> list[Point]:
    """The ordered points where ``model`` can be cut or tapped.

    Args:
        model: a classifier (timm, transformers ``*ForImageClassification`` / ``*ForSequenceClassification``,
            or any ``nn.Module`` mapping one tensor to ``(batch, classes)`` logits).
        example_input: what to call the model with; built from the model's data config when omitted.
            A tensor, or a dict of keyword tensors for transformers models (masks included); a tensor given to
            a transformers model is its main input (``pixel_values`` or ``input_ids``).
        explain: also print every candidate module (stage, block and embedding outputs on the main path) with
            the reason it is not a point. The reasons are logged at DEBUG level on ``pnc_surgery.points`` anyway.

    Returns:
        The points in execution order (see :class:`Point`).

    Raises:
        InvalidInputError: ``model`` is not a module, or ``example_input`` does not fit it.
        UnsupportedModelError: the model has no classifier, its output does not depend on its input, or no
            module is a cut (the message gives the reasons of the candidates).
    """
    backend = backend_for(model)
    inputs = resolve_example_input(model, example_input, backend)
    candidates = _candidate_names(model)
    verdicts: dict[str, str] = {}
    with eval_mode(model):
        reference, num_classes = _checked_reference(model, inputs, backend, keep=candidates.__contains__)
        batch = int(reference.logits.shape[0])
        main = main_tensor(inputs, backend.main_input_name(model))
        spatial = (int(main.shape[-2]), int(main.shape[-1])) if main.is_floating_point() and main.dim() == 4 else None
        hint, prefix = backend.layout_hint(model), backend.prefix_tokens(model)

        shaped: list[tuple[ModuleCall, str]] = []
        for call in reference.calls.values():
            if call.name not in candidates:
                continue
            reason, out = _shape_verdict(call, batch), call.output
            module_hint = "NCHW" if isinstance(call.module, CHANNELS_FIRST_MODULES) else hint
            layout = _layout(tuple(out.shape[1:]), spatial, module_hint) if reason is None and out is not None else None
            if layout is None:
                verdicts[call.name] = reason or "its output has no known layout"
            else:
                shaped.append((call, layout))
        last_post = max((call.post for call, _ in shaped), default=-1)
        classifiers = classifier_names(reference, num_classes, after=last_post)
        errors = _substitution_errors_of(model, inputs, backend, [call.name for call, _ in shaped], classifiers)
        points: list[tuple[ModuleCall, str]] = []
        seen_outputs: dict[int | None, ModuleCall] = {}
        for call, layout in sorted(shaped, key=lambda item: item[0].post):
            error = errors.get(call.name, (math.inf, False))[0]
            if not error <= SUBSTITUTION_RTOL:
                verdicts[call.name] = _not_a_cut(error)
                continue
            alias = seen_outputs.get(call.output_id)
            if alias is not None and (alias.name.startswith(call.name + ".") or call.name.startswith(alias.name + ".")):
                outer, inner = (call, alias) if alias.name.startswith(call.name + ".") else (alias, call)
                verdicts[inner.name] = f"its output is the same tensor as {outer.name!r}'s, offered under that name"
                seen_outputs[call.output_id] = outer
                points = [p for p in points if p[0].name != alias.name] + [(outer, layout)]
                continue
            seen_outputs[call.output_id] = call
            points.append((call, layout))
    points.sort(key=lambda item: item[0].post)
    for call, _ in points:
        verdicts.pop(call.name, None)
    reading = {name for name, (_, reads_input) in errors.items() if reads_input}
    _report(model, reference, points, verdicts, reading, explain)
    described = [
        _describe(call.name, index, tuple(call.output.shape[1:]), layout, spatial, prefix, errors[call.name][1])
        for index, (call, layout) in enumerate(points)
        if call.output is not None
    ]
    if not described:
        reasons = Counter(verdicts.values()).most_common(3)
        summary = "; ".join(f"{count} candidates: {reason}" for reason, count in reasons)
        raise UnsupportedModelError(f"no module of {type(model).__name__} is a valid cut point ({summary})")
    return described


def _report(
    model: nn.Module,
    trace: Trace,
    points: list[tuple[ModuleCall, str]],
    verdicts: dict[str, str],
    reading: set[str],
    explain: bool,
) -> None:
    """Log (and with ``explain`` print) each candidate in execution order: a point, or why it is not one."""
    offered = {call.name for call, _ in points}
    names = sorted(offered | set(verdicts), key=lambda n: trace.calls[n].post)

    def verdict(name: str) -> str:
        if name not in offered:
            return f"not a point: {verdicts[name]}"
        return "point, with the token ids (the rest of the model reads them too)" if name in reading else "point"

    lines = [f"{name}: {verdict(name)}" for name in names]
    for line in lines:
        logger.debug("%s %s", type(model).__name__, line)
    if explain:
        print(f"find_points({type(model).__name__}): {len(offered)} points among {len(names)} candidates")
        print("\n".join(f"  {line}" for line in lines))
        print(
            f"  ({len(trace.calls) - len(names) - 1} other modules, inside blocks, are not candidates; "
            "check_cut(model, name, example_input) tests one and says why it is not a cut)"
        )
