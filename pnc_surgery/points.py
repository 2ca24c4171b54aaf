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
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .backends import Backend, ModelInputs, backend_for
from .backends.base import call_model, main_tensor
from .errors import InvalidInputError, UnsupportedModelError
from .tracing import ModuleCall, Trace, classifier_names, eval_mode, main_output, trace_model, with_main_output

__all__ = [
    "CutInputs",
    "Point",
    "check_cut",
    "cut_inputs",
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
        live: modules that finished before the cut which a branch cut here still computes from the token ids (the
            encoder, for a cut in the decoder that also reads the encoder's output; an embedding called again
            after the cut). Empty for most points: a branch replaces everything before its cut.
    """

    name: str
    index: int
    shape: tuple[int, ...]
    layout: str
    reduction: int | None
    width: int
    reads_input: bool = False
    live: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "live": list(self.live)}

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
                live=tuple(str(name) for name in data.get("live", ())),
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
    live: tuple[str, ...],
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
        live=live,
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
    (what a branch stubs), (for the modules asked for) its feature, which modules were given integer tensors (token
    ids, as an embedding is) and when the last such call started, and which module outputs later calls were given
    (by identity: what the model passed on unchanged, as an encoder's output to a decoder's cross-attention)."""

    steps: dict[str, list[tuple[int, int]]]
    plain: dict[str, bool]
    outputs: dict[str, list[torch.Tensor | None]]
    last_id_read: int = -1
    id_readers: set[str] = field(default_factory=set)
    produced: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    """``id`` of a module's feature -> the modules that returned it, with the step their call ended."""
    given: list[tuple[str, int, set[int]]] = field(default_factory=list)
    """Each call's module, start step and the ``id`` s of the tensors it was given."""
    streams: dict[str, int] = field(default_factory=dict)
    """Each module's first call's main input: the ``id`` of its first positional tensor (else its first keyword one)."""
    containers: set[str] = field(default_factory=set)
    """The names of the model's ``Sequential`` and ``ModuleList`` modules."""
    extras: dict[str, set[int]] = field(default_factory=dict)
    """For the modules asked for, the ``id`` s of the tensors their first call returned besides its feature."""


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a call's arguments (nested in tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)


def _record_calls(
    model: nn.Module, inputs: ModelInputs, keep: Collection[str] = (), extras_of: Collection[str] = ()
) -> _Calls:
    record = _Calls(steps={}, plain={}, outputs={})
    counter = iter(range(10**9))
    started: dict[str, list[int]] = {}
    alive: list[torch.Tensor] = []  # holds the features whose ids are recorded, so no id is reused
    handles = []

    def on_pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            step = next(counter)
            started.setdefault(name, []).append(step)
            given = list(_tensors([args, kwargs]))
            record.given.append((name, step, {id(t) for t in given}))
            if given and name not in record.streams:
                record.streams[name] = id(given[0])
            if any(_holds_ids(t) for t in given):
                record.last_id_read = step
                record.id_readers.add(name)

        return hook

    def on_post(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            end = next(counter)
            record.steps.setdefault(name, []).append((started[name].pop(), end))
            feature, packed = main_output(output)
            record.plain[name] = feature is not None and not packed
            if feature is not None:
                alive.append(feature)
                record.produced.setdefault(id(feature), []).append((name, end))
            if name in keep:
                record.outputs.setdefault(name, []).append(None if feature is None else feature.detach().clone())
            if packed and name in extras_of and name not in record.extras:
                others = list(_tensors(list(output[1:])))
                alive.extend(others)
                record.extras[name] = {id(t) for t in others}

        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, (nn.Sequential, nn.ModuleList)):
                record.containers.add(name)
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


@dataclass(frozen=True)
class _Plan:
    """How a branch that reads the token ids replaces what finished before its cut: ``stubs`` (the outermost
    modules returning a plain tensor, all their calls stubbed) and ``live`` (modules it computes from the ids)."""

    stubs: tuple[str, ...]
    live: frozenset[str]

    @property
    def live_units(self) -> tuple[str, ...]:
        """The outermost live modules, in name order (what :attr:`Point.live` lists)."""
        return tuple(sorted(n for n in self.live if not any(n.startswith(o + ".") for o in self.live)))


def _stack(calls: _Calls, name: str) -> str | None:
    """The module holding ``name``'s stack (the parent of its outermost ``Sequential`` / ``ModuleList`` ancestor, as
    a decoder holds its layers); ``None`` when ``name`` is in no such container or that module was not called."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        if ".".join(parts[:depth]) in calls.containers:
            stack = ".".join(parts[: depth - 1])
            return stack if stack in calls.steps else None
    return None


def _plan(calls: _Calls, name: str) -> _Plan:
    """What a branch cut at ``name`` that is given the token ids stubs and what it keeps live.

    Live: modules called both before and after the cut started (a shared embedding; a branch computes every call),
    and, where the rest of the model is given the output of a module that finished before the cut (by identity: a
    decoder's cross-attention given the encoder's output), every module that finished by then, provided the stack
    holding the cut had not yet started, only that stack's later modules are given the output, and it is not the
    main input of the cut or of a module around it: an encoder beside its decoder is computed live, not the
    embeddings a residual carries around the cut, nor a pooled output a head reads instead of the cut's. The rest
    of what finished before the cut is stubbed.
    """
    start = calls.steps[name][0][0]
    inside = lambda n: n == name or n.startswith(name + ".")  # noqa: E731
    before = {
        n for n, steps in calls.steps.items() if steps[0][1] < start and not inside(n) and not name.startswith(n + ".")
    }
    live = {n for n in before if calls.steps[n][-1][1] >= start}
    earlier = {i: end for i, made in calls.produced.items() for n, end in made if end < start and n in before}
    reads = [(module, ids & earlier.keys()) for module, step, ids in calls.given if step > start and not inside(module)]
    reads = [(module, ids) for module, ids in reads if ids]
    read = {i for _, ids in reads for i in ids}
    around = {calls.streams.get(n) for n in [name, *(n for n in calls.steps if name.startswith(n + "."))]}
    stack = _stack(calls, name)
    horizon = max((earlier[i] for i in read), default=-1)
    if (
        read
        and stack is not None
        and horizon < calls.steps[stack][0][0]
        and all(module.startswith(stack + ".") for module, _ in reads)
        and not around & read
    ):
        live.update(n for n in before if calls.steps[n][-1][1] <= horizon)
    stubs: list[str] = []
    for n in sorted((n for n in before if n not in live), key=lambda n: n.count(".")):
        if calls.plain[n] and not any(n.startswith(s + ".") for s in stubs):
            stubs.append(n)
    return _Plan(stubs=tuple(stubs), live=frozenset(live))


def _input_reading_errors(
    model: nn.Module,
    first: Trace,
    names: list[str],
    inputs: ModelInputs,
    second_inputs: ModelInputs,
    baseline: torch.Tensor,
    spread: float,
    backend: Backend,
) -> dict[str, tuple[float, tuple[str, ...]]]:
    """How far the answer on the *first* input moves when what a branch stubs before ``name`` (see :func:`_plan`)
    answers as on the second input and ``name`` keeps its own output, relative to the inputs' difference; with the
    live modules (:attr:`Point.live`) the branch keeps.

    0 means the rest of the model depends on ``name``'s output and on the input itself (directly, or through the
    live modules), not on anything else computed before ``name``: a cut for a branch that is given the input (token
    ids) besides the feature. A module whose output does not lead with the batch is left alone where both inputs
    give it the same value (position tables) and fails the candidate otherwise. A candidate after which no module,
    and no live one, is given integer tensors (token ids, as the decoder's embedding is) fails without a forward:
    nothing the branch runs could read the ids. Candidates share forwards as in :func:`_substitution_errors`.
    """
    calls = _record_calls(model, inputs)
    plans = {name: _plan(calls, name) for name in names}
    names = [
        name
        for name, plan in plans.items()
        if calls.steps[name][0][0] < calls.last_id_read or plan.live & calls.id_readers
    ]
    if not names:
        return {}
    swapped = sorted({s for name in names for s in plans[name].stubs})
    mine = _record_calls(model, inputs, set(swapped)).outputs
    theirs = _record_calls(model, second_inputs, set(swapped)).outputs
    batch = baseline.shape[0]
    errors: dict[str, tuple[float, tuple[str, ...]]] = {}
    for chunk in _chunks(names, [first.calls[n].output for n in names]):
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
                users = [n for n in chunk if module_name in plans[n].stubs]
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
            errors.update({name: (math.inf, ()) for name in chunk})
            continue
        finally:
            for handle in handles:
                handle.remove()
        answers = _compare_outputs(trace)
        for name in chunk:
            error = (answers[rows_of[name]] - baseline).abs().max().item() / spread
            errors[name] = (math.inf if name in failed else error, plans[name].live_units)
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


class _Verdict(NamedTuple):
    """A candidate's relative error in the substitution test, whether it passes only as a point that reads the
    input (token models), and the modules a branch cut there keeps live (:attr:`Point.live`)."""

    error: float
    reads_input: bool = False
    live: tuple[str, ...] = ()
    reason: str | None = None
    """Why the candidate is no cut whatever its error, where that is not the error itself."""

    def why_not(self) -> str:
        return self.reason or _not_a_cut(self.error)


REBUILT_EXTRAS = (
    "it also returns a tensor it computed that the rest of the model reads (a position bias made here): a branch "
    "cut here could not rebuild it"
)


def _extras_read_later(model: nn.Module, inputs: ModelInputs, first: Trace, names: list[str]) -> set[str]:
    """The candidates among ``names`` returning a tuple with a tensor besides the feature, not passed on from their
    arguments, that a later call is given (a branch's feed returns the feature and constants: it cannot rebuild it)."""
    suspects = {
        name
        for name in names
        if any(
            isinstance(extra, torch.Tensor) and key is None
            for extra, key in zip(first.calls[name].extras, first.calls[name].passed_on)
        )
    }
    if not suspects:
        return set()
    calls = _record_calls(model, inputs, extras_of=suspects)
    return {
        name
        for name in suspects
        if any(step > calls.steps[name][0][1] and ids & calls.extras.get(name, set()) for _, step, ids in calls.given)
    }


def _substitution_errors_of(
    model: nn.Module, inputs: ModelInputs, backend: Backend, names: list[str], classifiers: list[str]
) -> dict[str, _Verdict]:
    """Each of ``names``' verdict in the substitution test (on a twin without dead residual paths); a name passes
    when its error is at most ``SUBSTITUTION_RTOL``."""
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
        name: _Verdict(error)
        for name, error in _substitution_errors(probe, first, present, second_inputs, baseline, spread, backend).items()
    }
    errors.update(
        {name: _Verdict(math.inf, reason=REBUILT_EXTRAS) for name in _extras_read_later(probe, inputs, first, present)}
    )
    failed = [
        name for name, verdict in errors.items() if not verdict.error <= SUBSTITUTION_RTOL and verdict.reason is None
    ]
    reads_ids = (
        isinstance(inputs, Mapping) and not main_tensor(inputs, backend.main_input_name(model)).is_floating_point()
    )
    if failed and reads_ids:  # a branch can be given keyword token ids, not a positional tensor
        reading = _input_reading_errors(probe, first, failed, inputs, second_inputs, baseline, spread, backend)
        errors.update(
            {name: _Verdict(error, True, live) for name, (error, live) in reading.items() if error <= SUBSTITUTION_RTOL}
        )
    return errors


class CutInputs(NamedTuple):
    """What a branch cut at a module needs besides the feature there (see :func:`cut_inputs`)."""

    reads_input: bool
    """The rest of the model also reads the token ids (:attr:`Point.reads_input`)."""
    live: tuple[str, ...]
    """Modules before the cut that the branch computes from the ids (:attr:`Point.live`)."""


def cut_inputs(model: nn.Module, name: str, inputs: ModelInputs) -> CutInputs:
    """:func:`check_cut`, returning what a branch cut at ``name`` needs besides the feature."""
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
        verdict = _substitution_errors_of(model, inputs, backend, [name], classifiers).get(name, _Verdict(math.inf))
        if not verdict.error <= SUBSTITUTION_RTOL:
            raise UnsupportedModelError(f"{name!r} is not a cut point of {type(model).__name__}: {verdict.why_not()}")
    return CutInputs(verdict.reads_input, verdict.live)


def check_cut(model: nn.Module, name: str, inputs: ModelInputs) -> bool:
    """Raise :class:`UnsupportedModelError` unless the rest of ``model`` depends on module ``name``'s output alone,
    or (token models) on it and the token ids.

    Returns:
        Whether the rest of the model also reads the token ids (:attr:`Point.reads_input`).
    """
    return cut_inputs(model, name, inputs).reads_input


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
            verdict = errors.get(call.name, _Verdict(math.inf))
            if not verdict.error <= SUBSTITUTION_RTOL:
                verdicts[call.name] = verdict.why_not()
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
    reading = {name: verdict.live for name, verdict in errors.items() if verdict.reads_input}
    _report(model, reference, points, verdicts, reading, explain)
    described = [
        _describe(
            call.name,
            index,
            tuple(call.output.shape[1:]),
            layout,
            spatial,
            prefix,
            errors[call.name].reads_input,
            errors[call.name].live,
        )
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
    reading: dict[str, tuple[str, ...]],
    explain: bool,
) -> None:
    """Log (and with ``explain`` print) each candidate in execution order: a point, or why it is not one."""
    offered = {call.name for call, _ in points}
    names = sorted(offered | set(verdicts), key=lambda n: trace.calls[n].post)

    def verdict(name: str) -> str:
        if name not in offered:
            return f"not a point: {verdicts[name]}"
        if name not in reading:
            return "point"
        live = f"; a branch here computes {', '.join(reading[name])} from them" if reading[name] else ""
        return f"point, with the token ids (the rest of the model reads them too{live})"

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
