"""Making a patch from live models: :func:`from_parts` (ready parts, what ``clone`` uses), :func:`assemble` (by hand).

Both record what the file format needs (the source architecture, the cut and insertion points, the target's
fingerprint) while the models are at hand; after this a patch needs neither model again.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import adapters as _adapters
from ..backends import ModelInputs, backend_for
from ..backends.base import image_size
from ..branch import Branch
from ..errors import InvalidInputError
from ..gate import Gate
from ..points import (
    Point,
    classifier_names,
    eval_mode,
    resolve_example_input,
    trace_model,
)
from .config import (
    BranchSpec,
    GateSpec,
    PatchConfig,
    PointSpec,
    SourceSpec,
    TargetFingerprint,
    check_architecture,
    clean_architecture,
)
from .hooks import weights_sample

if TYPE_CHECKING:
    from .module import Patch

__all__ = ["assemble", "from_parts", "module_specs", "target_fingerprint"]


def _versions() -> dict[str, str]:
    """The versions a patch was made with, read from the installed metadata (importing transformers to ask it
    would cost a timm-only clone seconds)."""
    from .. import __version__

    return {
        "pnc_surgery": __version__,
        "torch": torch.__version__,
        "timm": importlib.metadata.version("timm"),
        "transformers": importlib.metadata.version("transformers"),
    }


def target_fingerprint(
    target: nn.Module, insertion: Point, example_input: ModelInputs | None = None
) -> TargetFingerprint:
    """What a patch checks on attach: the target's identity, insertion module, shapes, and a sample of its weights.

    Args:
        target: the target model (not modified).
        insertion: the insertion point.
        example_input: an input to trace on (built from the model's config when omitted).
    """
    backend = backend_for(target)
    module = target.get_submodule(insertion.name)
    inputs = resolve_example_input(target, example_input, backend)
    with eval_mode(target):
        trace = trace_model(target, inputs, backend)
        num_classes = int(trace.logits.shape[-1])
        classifiers = classifier_names(trace, num_classes, after=trace.calls[insertion.name].post)
        pre_logits = trace_model(target, inputs, backend, classifiers=classifiers).pre_logits
    return TargetFingerprint(
        id=backend.identity(target),
        family=backend.family,  # type: ignore[arg-type]
        class_name=type(target).__name__,
        num_classes=num_classes,
        insertion_type=type(module).__name__,
        parameter_shapes={name: tuple(p.shape) for name, p in module.named_parameters()},
        feature_shape=tuple(insertion.shape),
        classifiers=tuple(classifiers),
        pre_logits_width=0 if pre_logits is None else int(pre_logits.shape[1]),
        weights_sample=weights_sample(target),
    )


def _point(point: Point) -> PointSpec:
    return PointSpec(point.name, point.index, tuple(point.shape), point.layout, point.reduction, point.width)  # type: ignore[arg-type]


def from_parts(
    patch_class: type[Patch],
    source: nn.Module,
    target: nn.Module,
    cut: Point,
    insertion: Point,
    branch: Branch,
    adapter: _adapters.Adapter,
    gate: Gate | str,
    *,
    class_names: Sequence[str] | None = None,
    target_input: ModelInputs | None = None,
    source_kwargs: Mapping[str, Any] | None = None,
) -> Patch:
    """A patch from ready parts, with the metadata (source architecture, target fingerprint) filled in.

    Args:
        patch_class: the class to make (``Patch``).
        source, target: the two models (not modified).
        cut, insertion: the points the branch starts at (source) and reads from (target).
        branch, adapter: the cloned tail (already cut to the cloned classes) and the adapter.
        gate: a gate, or its kind (``"energy"``, ``"learned"``, ``"none"``) for a new unfitted one.
        class_names: names of the branch's classes (default: the source's label names, else ``class_<id>``).
        target_input: an example target input (built from the model's config when omitted).
        source_kwargs: timm ``create_model`` kwargs of the source, when they cannot be inferred.
    """
    source_backend = backend_for(source)
    classes = [int(c) for c in branch.classes]
    names = list(class_names) if class_names is not None else _class_names(source_backend.class_names(source), classes)
    if len(names) != len(classes):
        raise InvalidInputError(f"class_names has {len(names)} names for {len(classes)} classes")
    fingerprint = target_fingerprint(target, insertion, target_input)
    if isinstance(gate, str):
        gate = Gate.unfitted(gate, fingerprint.num_classes, len(classes), fingerprint.pre_logits_width)
    architecture = check_architecture(
        clean_architecture(source_backend.architecture(source, **dict(source_kwargs or {})))
    )
    config = PatchConfig(
        source=SourceSpec(source_backend.identity(source), architecture),
        cut=_point(cut),
        insertion=_point(insertion),
        target=fingerprint,
        class_ids=tuple(classes),
        class_names=tuple(str(n) for n in names),
        **module_specs(branch, adapter, gate),
        versions=_versions(),
    )
    return patch_class(branch, adapter, gate, config)


def module_specs(branch: Branch, adapter: _adapters.Adapter, gate: Gate) -> dict[str, Any]:
    """The ``adapter``, ``branch`` and ``gate`` fields of a :class:`PatchConfig`, read from the live modules."""
    return {
        "adapter": adapter.spec(),
        "branch": BranchSpec.from_dict(branch.spec()),
        "gate": GateSpec.from_dict(gate.spec()),
    }


def assemble(
    patch_class: type[Patch],
    source: nn.Module,
    target: nn.Module,
    cut: Point | str,
    insertion: Point | str,
    classes: Sequence[int] | None = None,
    *,
    source_input: ModelInputs | None = None,
    target_input: ModelInputs | None = None,
    class_names: Sequence[str] | None = None,
    adapter_hidden: int = 0,
    gate: str = "energy",
    source_kwargs: Mapping[str, Any] | None = None,
) -> Patch:
    """Build an untrained patch by hand: the source tail from ``cut``, an identity-where-possible adapter.

    Args:
        patch_class: the class to make (``Patch``).
        source: the model to copy classes from (not modified).
        target: the model the patch is for (not modified).
        cut: source point (or module name) where the branch starts.
        insertion: target point (or module name) whose output feeds the branch.
        classes: source class ids to clone, in output order (default: all).
        source_input, target_input: example inputs (built from the models' configs when omitted).
        class_names: names of ``classes`` (default: the source's label names, else ``class_<id>``).
        adapter_hidden: width of the adapter's residual bottleneck (0: a 1x1 projection only).
        gate: ``"energy"``, ``"learned"`` (fit it before use) or ``"none"``.
        source_kwargs: timm ``create_model`` kwargs of the source, when they cannot be inferred.
    """
    from ..points import find_points

    source_input = resolve_example_input(source, source_input, backend_for(source))
    target_input = resolve_example_input(target, target_input, backend_for(target))
    cut_point = _as_point(source, cut, source_input, find_points)
    insertion_point = _as_point(target, insertion, target_input, find_points)
    branch = Branch.from_model(source, cut_point, source_input)
    all_classes = list(branch.classes)
    classes = list(all_classes if classes is None else classes)
    unknown = [c for c in classes if c not in all_classes]
    if not classes or unknown:
        raise InvalidInputError(
            f"classes {unknown[:10] or classes[:10]} are not classes of the source (it has {len(all_classes)})"
        )
    branch.keep_classes(classes)
    adapter = _adapters.Adapter(
        _adapters.feature_spec(insertion_point, image_size(target_input)),
        _adapters.feature_spec(cut_point, image_size(source_input)),
        hidden=adapter_hidden,
    )
    return from_parts(
        patch_class,
        source,
        target,
        cut_point,
        insertion_point,
        branch,
        adapter,
        gate,
        class_names=class_names,
        target_input=target_input,
        source_kwargs=source_kwargs,
    )


def _as_point(model: nn.Module, point: Point | str, inputs: ModelInputs, find: Any) -> Point:
    if isinstance(point, Point):
        return point
    points = find(model, inputs)
    for candidate in points:
        if candidate.name == point:
            return candidate
    raise InvalidInputError(
        f"{point!r} is not a cut point of {type(model).__name__}; points: {[p.name for p in points]}"
    )


def _class_names(names: list[str] | None, classes: Sequence[int]) -> list[str]:
    return [names[c] if names and c < len(names) else f"class_{c}" for c in classes]
