"""Clone data: turn what the user passes into tensors, and check it against both models before any training.

``data`` may be a ``Dataset``, a ``DataLoader`` or any iterable of ``(x, y)`` pairs or batches; ``x`` is an
image tensor or (for text models) a mapping of keyword tensors such as ``input_ids`` and
``attention_mask``. Clone data is small (tens to hundreds of examples per class), so it is held in memory.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backends import Backend, ModelInputs
from .errors import InvalidInputError
from .tracing import eval_mode

logger = logging.getLogger(__name__)

MIN_EXAMPLES_PER_CLASS = 2
"""A cloned class needs at least this many examples: with one, nothing is left to check the training on."""

__all__ = [
    "Examples",
    "collect",
    "batches",
    "to_view",
    "with_shifted_copies",
    "runs_on",
    "check_target_input",
    "source_view",
    "select_classes",
    "class_id",
    "check_replay",
    "short",
    "model_device",
    "to_device",
    "source_transform",
    "RENORMALISE_CHECK_EXAMPLES",
    "RENORMALISE_MARGIN",
]

RENORMALISE_CHECK_EXAMPLES = 128
"""Labelled clone examples on which :func:`source_transform` checks that renormalising helps the source."""
RENORMALISE_MARGIN = 0.05
"""How much more accurate the source must be on images as given than renormalised for them to be fed as given."""

Stats = tuple[tuple[float, ...], tuple[float, ...]]
"""Per-channel ``(mean, std)`` of an image normalisation."""


@dataclass
class Examples:
    """Inputs (in the target's format) and (optional) labels, held as tensors; with raw data, also the same
    examples in the source's own format."""

    inputs: ModelInputs
    labels: torch.Tensor | None
    source: ModelInputs | None = None
    """The same examples as the source's inputs, when each model was given its own preprocessing."""

    def __len__(self) -> int:
        return int(_first(self.inputs).shape[0])

    def select(self, index: torch.Tensor) -> Examples:
        return Examples(
            _index(self.inputs, index),
            None if self.labels is None else self.labels[index],
            None if self.source is None else _index(self.source, index),
        )

    def for_source(self) -> Examples:
        """The examples in the source's format (themselves when they carry no source inputs)."""
        return self if self.source is None else Examples(self.source, self.labels)


def _first(inputs: ModelInputs) -> torch.Tensor:
    return inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))


def _tensor(x: ModelInputs | None) -> torch.Tensor:
    """``x`` itself if it is a tensor; a ``TypeError`` (an input or label of another kind) otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    return x


def _mapping(x: ModelInputs) -> Mapping[str, torch.Tensor]:
    """``x`` itself if it is a mapping of tensors; a ``TypeError`` (a tensor among mappings) otherwise."""
    if isinstance(x, torch.Tensor):
        raise TypeError("expected a mapping of tensors, got a tensor")
    return x


def _index(inputs: ModelInputs, index: torch.Tensor | slice) -> ModelInputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


def _as_batch(x: Any) -> ModelInputs:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping) and all(isinstance(v, torch.Tensor) for v in x.values()):
        return dict(x)
    raise InvalidInputError(f"inputs must be tensors or mappings of tensors, got {type(x).__name__}")


def collect(data: Any, what: str = "data", labelled: bool = True) -> Examples:
    """Gather ``data`` into one :class:`Examples`.

    Single examples (an image ``(C, H, W)`` with an int label) and batches (``(B, C, H, W)`` with ``(B,)``
    labels, as a ``DataLoader`` yields) are both accepted.

    Raises:
        InvalidInputError: empty data, unlabelled data where labels are needed, or mixed shapes.
    """
    if data is None:
        raise InvalidInputError(f"{what} is None")
    if isinstance(data, Examples):
        return data
    if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
        raise InvalidInputError(
            f"{what} must be a Dataset, DataLoader or iterable of (x, y), got {type(data).__name__}"
        )
    xs, ys = [], []
    items: Iterable = data if isinstance(data, Iterable) else (data[i] for i in range(len(data)))
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            x, y = item[0], item[1]
        elif labelled:
            raise InvalidInputError(f"{what} must yield (x, y) pairs with y the source's class ids")
        else:
            x, y = (item[0] if isinstance(item, (tuple, list)) else item), None
        xs.append(_as_batch(x))
        ys.append(None if y is None else _as_labels(y, what))
    if not xs:
        raise InvalidInputError(f"{what} is empty")
    single = _first(xs[0]).dim() in (1, 3) if isinstance(xs[0], torch.Tensor) else _first(xs[0]).dim() == 1
    try:
        if single:
            inputs = (
                torch.stack([_tensor(x) for x in xs])
                if isinstance(xs[0], torch.Tensor)
                else {k: torch.stack([_mapping(x)[k] for x in xs]) for k in _mapping(xs[0])}
            )
            labels = torch.stack([_tensor(y).reshape(()) for y in ys]) if ys[0] is not None else None
        else:
            inputs = (
                torch.cat([_tensor(x) for x in xs])
                if isinstance(xs[0], torch.Tensor)
                else {k: torch.cat([_mapping(x)[k] for x in xs]) for k in _mapping(xs[0])}
            )
            labels = torch.cat([_tensor(y).reshape(-1) for y in ys]) if ys[0] is not None else None
    except (RuntimeError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{what} holds inputs of different shapes or kinds: {exc}") from None
    if labels is not None:
        if labels.is_floating_point() or labels.dim() != 1:
            raise InvalidInputError(
                f"{what} labels must be integer class ids, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        labels = labels.long()
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        inputs = inputs.float()
    for name, tensor in ({"inputs": inputs} if isinstance(inputs, torch.Tensor) else inputs).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).flatten(1).any(1).sum())
            raise InvalidInputError(f"{what} {name} hold NaN or infinite values (in {bad} of {len(tensor)} examples)")
    return Examples(inputs, labels)


def _as_labels(y: Any, what: str) -> torch.Tensor:
    """A label (or a batch of labels) as an integer tensor."""
    try:
        labels = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidInputError(
            f"{what} labels must be integer class ids of the source, got "
            + (short(y) if isinstance(y, list) else repr(y)[:80])
        ) from None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InvalidInputError(f"{what} labels must be integer class ids, got {labels.dtype}")
    return labels


def short(values: Sequence[Any], limit: int = 8) -> str:
    """``values`` for an error message: the first ``limit`` items, and how many there are when there are more."""
    items = list(values[: limit + 1]) if isinstance(values, Sequence) else list(values)
    if len(values) <= limit:
        return repr(items)
    return f"[{', '.join(repr(v)[:40] for v in items[:limit])}, ...] ({len(values)} items)"


def batches(examples: Examples, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Examples]:
    """Mini-batches of ``examples`` (shuffled when a generator is given)."""
    count = len(examples)
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, batch_size):
        yield examples.select(order[start : start + batch_size])


def to_view(inputs: ModelInputs, channels: int | None, size: Sequence[int] | None) -> ModelInputs:
    """Images resized and channel-matched for a model that expects ``(channels, *size)``.

    Grey images are repeated to three channels and colour images averaged to one; sizes are resampled
    bilinearly. Text inputs pass unchanged.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
        return inputs
    x = inputs
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise InvalidInputError(f"images have {x.shape[1]} channels; the model expects {channels}")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


def with_shifted_copies(examples: Examples, fraction: float = 1 / 8) -> tuple[Examples, torch.Tensor]:
    """The examples followed by four shifted copies, and which original each row comes from.

    Images are shifted by ``fraction`` of their size (right, left, down, up). Token inputs (a mapping with an
    ``attention_mask``, or a tensor of token ids) lose one token each, at four places spread over the attended tokens
    (never the first or last, usually special tokens); what follows moves up one place. Other inputs come back
    alone.

    A target has usually been trained on the replay inputs it is given, and is surer of them than of new inputs;
    slightly changed copies are nearer to what it will see, so a gate calibrated on them keeps its budget on new
    inputs (``benchmarks.pair_matrix``: a shift of 1/16 of a 32 px image still left 2.7-4.3% of new inputs of the
    target's classes through on three pairs against a 1% budget, 1/8 left 0.7-2.0%)."""
    inputs = examples.inputs
    sources = torch.arange(len(examples))
    merged: ModelInputs
    if isinstance(inputs, Mapping) and "attention_mask" in inputs:
        copies = [_without_token(inputs, (k, 5)) for k in range(1, 5)]
        merged = {key: torch.cat([inputs[key], *(copy[key] for copy in copies)]) for key in inputs}
    elif isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and not inputs.is_floating_point():  # token ids
        merged = torch.cat([inputs, *(_without_token({"input_ids": inputs}, (k, 5))["input_ids"] for k in range(1, 5))])
    elif isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and inputs.is_floating_point():
        height, width = inputs.shape[-2:]
        dy, dx = max(1, round(height * fraction)), max(1, round(width * fraction))
        padded = F.pad(inputs, (dx, dx, dy, dy), mode="replicate")
        shifted = [
            padded[..., dy + oy : dy + oy + height, dx + ox : dx + ox + width]
            for ox, oy in ((-dx, 0), (dx, 0), (0, -dy), (0, dy))
        ]
        merged = torch.cat([inputs, *shifted])
    else:
        return examples, sources
    labels = None if examples.labels is None else examples.labels.repeat(5)
    return Examples(merged, labels), sources.repeat(5)


def _without_token(inputs: Mapping[str, torch.Tensor], where: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Token inputs with one attended token left out, ``where = (k, n)`` of the way through the tokens between the
    first and the last attended one; the freed last place is masked (and 0 in every other input), or, without an
    ``attention_mask``, holds the last token again. Sequences of fewer than three tokens stay as they are."""
    masked = "attention_mask" in inputs
    mask = inputs["attention_mask"] if masked else torch.ones_like(inputs["input_ids"])
    length = mask.shape[1]
    attended = mask.long().sum(1)
    first = (mask != 0).long().argmax(1)
    drop = first + 1 + (where[0] * (attended - 2).clamp_min(0)) // where[1]
    positions = torch.arange(length).expand(len(mask), -1)
    index = torch.where(positions < drop[:, None], positions, (positions + 1).clamp_max(length - 1))
    keep = (attended < 3)[:, None]
    result = {}
    for key, value in inputs.items():
        if value.dim() != 2 or value.shape[1] != length:
            result[key] = value
            continue
        moved = value.gather(1, index.to(value.device))
        if masked:
            moved[:, -1] = 0
        result[key] = torch.where(keep.to(value.device), value, moved)
    return result


def model_device(model: nn.Module) -> torch.device:
    """The device ``model`` computes on: its first parameter's (or buffer's), the CPU for a model without tensors, and
    for weights that accelerate offloaded (left on the meta device) the execution device of its hooks."""
    tensor: torch.Tensor | None = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    if tensor is not None and tensor.device.type == "meta":
        devices = (getattr(getattr(module, "_hf_hook", None), "execution_device", None) for module in model.modules())
        device = next((d for d in devices if d is not None), None)
        return tensor.device if device is None else torch.device(device)
    return torch.device("cpu") if tensor is None else tensor.device


def to_device(inputs: ModelInputs, device: torch.device) -> ModelInputs:
    """``inputs`` (a tensor or keyword tensors) on ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return {k: v.to(device) for k, v in inputs.items()}


def runs_on(model: nn.Module, backend: Backend, inputs: ModelInputs) -> str | None:
    """``None`` when ``model`` computes logits on ``inputs`` (in the model's call form); else what went wrong."""
    try:
        _logits(model, backend, inputs)
    except Exception as exc:  # any failure here means "this model cannot take these inputs"
        return f"{type(exc).__name__}: {exc}"
    return None


@torch.no_grad()
def _logits(model: nn.Module, backend: Backend, inputs: ModelInputs) -> torch.Tensor:
    """``model``'s logits on ``inputs`` (moved to its device, in its call form), in eval mode."""
    with eval_mode(model):
        call = backend.call_inputs(model, to_device(inputs, model_device(model)))
        return backend.logits(model(**call) if isinstance(call, Mapping) else model(call))


def _shape(inputs: ModelInputs) -> tuple[int, ...]:
    """Shape (without batch) of the data tensor, for error messages."""
    return tuple(_first(inputs).shape[1:])


def _empty(inputs: ModelInputs) -> bool:
    """Whether the inputs hold no values at all (images of size 0 cannot be resized)."""
    return _first(inputs).numel() == 0


def check_target_input(target: nn.Module, backend: Backend, sample: ModelInputs) -> None:
    """Raise :class:`InvalidInputError` unless the target runs on the clone data as given."""
    error = runs_on(target, backend, sample)
    if error:
        raise InvalidInputError(
            f"the target ({type(target).__name__}) cannot run on the clone data "
            f"(inputs of shape {_shape(sample)}): {error}"
        )


def source_view(source: nn.Module, backend: Backend, sample: ModelInputs) -> tuple[int, tuple[int, int]] | None:
    """How clone images must be resized for the source (``None``: they fit as they are).

    Raises:
        InvalidInputError: the source runs neither on the data nor on the data resized to the size it expects.
    """
    error = runs_on(source, backend, sample)
    if error is None:
        return None
    expected = backend.expected_image(source)
    if expected is not None and not _empty(sample) and runs_on(source, backend, to_view(sample, *expected)) is None:
        return expected
    raise InvalidInputError(
        f"the source ({type(source).__name__}) cannot run on the clone data (inputs of shape {_shape(sample)}"
        + (f"; it expects {expected}" if expected else "")
        + f"): {error}"
    )


def _channel_stats(stats: Stats, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``stats`` as ``(1, C, 1, 1)`` tensors for ``channels`` channels (averaged for grey images); ``None`` if they
    do not fit."""
    mean, std = (torch.tensor(values, dtype=torch.float32) for values in stats)
    if len(mean) != channels:
        if channels == 1:
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        elif len(mean) == 1:
            mean, std = mean.expand(channels), std.expand(channels)
        else:
            return None
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def source_transform(
    source: nn.Module,
    backend: Backend,
    sample: ModelInputs,
    target_stats: Stats | None,
    transform: Callable[[ModelInputs], ModelInputs] | None = None,
    labelled: Examples | None = None,
) -> Callable[[ModelInputs], ModelInputs] | None:
    """How inputs in the target's format become the source's (``None``: they are fed as they are).

    With ``transform`` (the user's), that is checked to give inputs the source runs on. Otherwise images are resized
    and channel-matched when the source expects another size (:func:`source_view`), and when both models record
    their normalisation and the two differ, pixels are brought back with the target's statistics and normalised
    again with the source's, so the source never sees images normalised for another model. What a model records is
    its pretrained preprocessing, not necessarily what it was trained on since: with ``labelled`` examples (labels
    in the source's class ids), images are fed as given when the source answers
    :data:`RENORMALISE_CHECK_EXAMPLES` of them better so (by :data:`RENORMALISE_MARGIN`) than renormalised.

    Raises:
        InvalidInputError: the source cannot run on what the transform (given or derived) makes of ``sample``.
    """
    if transform is not None:
        if not callable(transform):
            raise InvalidInputError(f"source_transform must be callable, got {type(transform).__name__}")
        try:
            mapped = transform(sample)
        except Exception as exc:  # the user's function: any failure is reported as what it is
            raise InvalidInputError(f"source_transform failed on the clone data: {type(exc).__name__}: {exc}") from None
        error = runs_on(source, backend, mapped)
        if error:
            raise InvalidInputError(f"the source cannot run on what source_transform returns: {error}")
        return transform
    view = source_view(source, backend, sample)
    source_stats = backend.normalization(source)
    images = isinstance(sample, torch.Tensor) and sample.dim() == 4 and sample.is_floating_point()
    renormalise = images and target_stats is not None and source_stats is not None and target_stats != source_stats
    plain = None if view is None else (lambda x: to_view(x, *view))
    if not renormalise:
        return plain
    assert isinstance(sample, torch.Tensor) and target_stats is not None and source_stats is not None
    channels = view[0] if view is not None else int(sample.shape[1])
    stats_in, stats_out = _channel_stats(target_stats, int(sample.shape[1])), _channel_stats(source_stats, channels)
    if stats_in is None or stats_out is None:
        raise InvalidInputError(
            f"the target's normalisation {target_stats} or the source's {source_stats} does not fit images of "
            f"{int(sample.shape[1])} channels: pass source_transform= to map the target's inputs for the source"
        )

    def renormalised(x: ModelInputs) -> ModelInputs:
        assert isinstance(x, torch.Tensor)
        (mean_in, std_in), (mean_out, std_out) = stats_in, stats_out
        pixels: ModelInputs = x * std_in.to(x) + mean_in.to(x)
        pixels = to_view(pixels, *view) if view is not None else pixels
        assert isinstance(pixels, torch.Tensor)
        return (pixels - mean_out.to(pixels)) / std_out.to(pixels)

    if labelled is not None and labelled.labels is not None:
        renormalised_accuracy = _accuracy(source, backend, labelled, renormalised)
        given_accuracy = _accuracy(source, backend, labelled, plain)
        if given_accuracy > renormalised_accuracy + RENORMALISE_MARGIN:
            logger.warning(
                "the source answers the clone data right %.0f%% of the time as given and %.0f%% renormalised from "
                "the target's recorded statistics %s to its own %s: feeding it the images as given (pass "
                "source_transform= to choose)",
                100 * given_accuracy,
                100 * renormalised_accuracy,
                target_stats,
                source_stats,
            )
            return plain
    return renormalised


def _accuracy(
    model: nn.Module,
    backend: Backend,
    labelled: Examples,
    transform: Callable[[ModelInputs], ModelInputs] | None,
    batch_size: int = 64,
) -> float:
    """Top-1 accuracy of ``model`` on up to :data:`RENORMALISE_CHECK_EXAMPLES` of ``labelled`` (spread over them),
    after ``transform``."""
    assert labelled.labels is not None
    index = torch.linspace(0, len(labelled) - 1, min(len(labelled), RENORMALISE_CHECK_EXAMPLES)).long().unique()
    chosen = labelled.select(index)
    assert chosen.labels is not None
    answers = [
        _logits(model, backend, transform(part.inputs) if transform is not None else part.inputs).argmax(-1).cpu()
        for part in batches(chosen, batch_size)
    ]
    return float((torch.cat(answers) == chosen.labels).float().mean())


def select_classes(
    labels: torch.Tensor,
    classes: Sequence[int | str] | None,
    num_source_classes: int,
    names: Sequence[str] | None = None,
) -> list[int]:
    """The source classes to clone, checked against the labels present and the source's class count.

    Args:
        labels: the clone data's labels (source class ids).
        classes: what the user asked for, as source class ids or label names (``None``: every class in ``labels``).
        num_source_classes: how many classes the source scores.
        names: the source's label names by class id, where it has them.

    Raises:
        InvalidInputError: labels outside the source, unknown names, empty or duplicate classes, classes without
            enough examples.
    """
    bad = labels[(labels < 0) | (labels >= num_source_classes)].unique().tolist()
    if bad:
        raise InvalidInputError(
            f"labels {short(bad)} are not classes of the source, which has {num_source_classes} classes"
        )
    present = sorted(labels.unique().tolist())
    if classes is not None and (isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable)):
        raise InvalidInputError(f"classes must be a sequence of source class ids, got {type(classes).__name__}")
    asked = list(present if classes is None else classes)
    if not asked:
        raise InvalidInputError("classes is empty: name at least one source class to clone")
    chosen = [class_id(c, names) for c in asked]
    if len(set(chosen)) != len(chosen):
        raise InvalidInputError(f"classes has duplicates: {short(sorted({c for c in chosen if chosen.count(c) > 1}))}")
    outside = [c for c in chosen if not 0 <= c < num_source_classes]
    missing = [c for c in chosen if c not in present]
    if outside or missing:
        raise InvalidInputError(
            f"classes {short(outside or missing)} "
            + ("are not classes of the source" if outside else f"have no examples in data (it has {short(present)})")
        )
    few = [c for c in chosen if int((labels == c).sum()) < MIN_EXAMPLES_PER_CLASS]
    if few:
        raise InvalidInputError(
            f"classes {short(few)} have fewer than {MIN_EXAMPLES_PER_CLASS} examples in data; a clone needs at least "
            f"{MIN_EXAMPLES_PER_CLASS} of each class (some to train on, some to check on)"
        )
    return chosen


def class_id(value: Any, names: Sequence[str] | None) -> int:
    """A class given by id or by the source's label name, as an id."""
    if isinstance(value, str):
        if names is None:
            raise InvalidInputError(
                f"class {value[:80]!r} is a name, but the source has no label names: pass class ids"
            )
        if value not in names:
            raise InvalidInputError(
                f"{value[:80]!r} is not a label name of the source; its names: {short(list(names))}"
            )
        return list(names).index(value)
    if isinstance(value, bool):
        raise InvalidInputError(f"classes must be source class ids or label names, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidInputError(f"classes must be source class ids or label names, got {repr(value)[:80]}") from None


def check_replay(replay: Examples, data: Examples, target: nn.Module, backend: Backend) -> None:
    """Raise :class:`InvalidInputError` unless the target runs on ``replay`` and its images are shaped like the data's.

    The gate compares the target's features on both, so replay images must have the clone images' size and channels.
    """
    inputs, reference = replay.inputs, data.inputs
    if isinstance(inputs, torch.Tensor) != isinstance(reference, torch.Tensor):
        raise InvalidInputError("replay must be of the same kind as data (image tensors, or keyword text tensors)")
    if (
        isinstance(inputs, torch.Tensor)
        and isinstance(reference, torch.Tensor)
        and inputs.shape[1:] != reference.shape[1:]
    ):
        raise InvalidInputError(
            f"replay inputs have shape {tuple(inputs.shape[1:])}; the clone data's are {tuple(reference.shape[1:])} "
            "(both are fed to the target, in its input format)"
        )
    error = runs_on(target, backend, replay.select(torch.arange(min(2, len(replay)))).inputs)
    if error:
        raise InvalidInputError(f"the target ({type(target).__name__}) cannot run on the replay data: {error}")
