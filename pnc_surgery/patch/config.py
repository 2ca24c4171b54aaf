"""The patch file format as typed, frozen dataclasses: what ``patch_config.json`` holds and the one place it is checked.

A patch config is untrusted input (it may come from any Hub repo), so :meth:`PatchConfig.from_dict` is the only
way a config enters the library: it checks every field's type, every size against a cap, and every architecture
option against an allowlist before anything is built from it, and raises :class:`PatchFormatError` naming the
field. ``to_dict`` writes the JSON back (``from_dict(to_dict(c)) == c``). Format 1 files (before the typed
config) load through the same validator; the fields they lack are left unset. docs/format.md documents the format.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..errors import PatchFormatError
from ..gate import SPACES

__all__ = [
    "FORMAT_VERSION",
    "AdapterSpec",
    "BranchSpec",
    "Family",
    "FeatureSpec",
    "GateKind",
    "GateSpec",
    "Layout",
    "PatchConfig",
    "PointSpec",
    "SourceSpec",
    "TargetFingerprint",
    "check_architecture",
]

FORMAT_VERSION = 2
Layout = Literal["NCHW", "NHWC", "NLC"]
GateKind = Literal["novelty", "learned", "energy", "none"]
Family = Literal["timm", "transformers"]

MAX_CLASSES = 100_000
MAX_NAME_CHARS = 1_000
MAX_DIMS = 8
MAX_DIM = 2**20
MAX_FEATURE_VALUES = 2**24  # one example's feature at a point; the load-time self-test allocates one
MAX_COUNT = 2**31
_LAYOUTS, _GATE_KINDS, _FAMILIES = get_args(Layout), get_args(GateKind), get_args(Family)
_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Options that read files, download, or select code: never taken from a patch file, whatever the allowlist says.
_REFUSED_OPTION = re.compile(
    r"pretrained(_cfg|_strict)?$|checkpoint_path|cache_dir|features_only|feature_cfg|kwargs_filter|scriptable|"
    r"exportable|no_jit|auto_map|remote_code|attn_implementation|experts_implementation|quantization_config|"
    r"_commit_hash|(^|_)(file|path|url|dir|token|revision)(s)?$"
)


def _fail(where: str, what: str, value: Any = None) -> PatchFormatError:
    shown = "" if value is None else f", got {_short_repr(value)}"
    return PatchFormatError(f"config field {where!r} {what}{shown}")


def _short_repr(value: Any, limit: int = 80) -> str:
    """A repr that never grows with the value (a list of a million classes makes a short message)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"{type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _fail(where, "must be a JSON object", value)
    return value


def _int(value: Any, where: str, low: int = 0, high: int = MAX_COUNT) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _fail(where, f"must be an integer in [{low}, {high}]", value)
    return value


def _str(value: Any, where: str, limit: int = MAX_NAME_CHARS) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _fail(where, f"must be a string of at most {limit} characters", value)
    return value


def _opt_str(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _hex(value: Any, where: str) -> str | None:
    if value is not None and not (isinstance(value, str) and _HEX64.fullmatch(value)):
        raise _fail(where, "must be null or a sha256 hex digest", value)
    return value


def _floats(value: Any, where: str, limit: int = 1024) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = _list(value, where, limit)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in items):
        raise _fail(where, "must be null or a list of finite numbers")
    return tuple(float(v) for v in items)


def _list(value: Any, where: str, limit: int) -> list:
    if not isinstance(value, (list, tuple)) or len(value) > limit:
        raise _fail(where, f"must be a list of at most {limit} items", value)
    return list(value)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    dims = tuple(_int(v, f"{where}[{i}]", 1, MAX_DIM) for i, v in enumerate(_list(value, where, MAX_DIMS)))
    if math.prod(dims) > MAX_FEATURE_VALUES:
        raise _fail(where, f"asks for more than {MAX_FEATURE_VALUES} values an example", list(dims))
    return dims


def _names(value: Any, where: str, limit: int = MAX_CLASSES) -> tuple[str, ...]:
    return tuple(_str(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where, limit)))


def _constants(value: Any, where: str, largest: int, depth: int = 0) -> Any:
    """Null, a boolean, an integer of at most ``largest`` (sizes), a finite number, a short list of these, or (as an
    item of the top list) ``{"argument": position or keyword}``: what the cut module passed on from its arguments."""
    if value is None or isinstance(value, bool) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, Mapping) and depth == 1:
        data = _obj(value, where)
        if set(data) != {"argument"}:
            raise _fail(where, 'must be {"argument": position or keyword} when an object', value)
        key = data["argument"]
        return {"argument": _int(key, where, 0, 64) if isinstance(key, int) else _str(key, f"{where}.argument")}
    if isinstance(value, int):
        return _int(value, where, -largest, largest)
    if isinstance(value, (list, tuple)) and depth < 2:
        return [_constants(v, f"{where}[{i}]", largest, depth + 1) for i, v in enumerate(_list(value, where, 16))]
    raise _fail(where, "must be null, a boolean, a finite number or a short list of these", value)


def _text_ids(value: Any, where: str) -> dict[str, int | None]:
    """``{"filler": id, "pad": id or null, "eos": id or null}``."""
    data = _obj(value, where)
    ids = {key: None if data.get(key) is None else _int(data[key], f"{where}.{key}") for key in ("pad", "eos")}
    return {"filler": _int(data.get("filler"), f"{where}.filler"), **ids}


def _literal(value: Any, where: str, allowed: tuple) -> Any:
    if value not in allowed:
        raise _fail(where, f"must be one of {list(allowed)}", value)
    return value


def _json(value: Any, where: str, depth: int = 0) -> Any:
    """A JSON value as it is (numbers finite), checked for depth; used for the free-form record fields."""
    if depth > 16:
        raise _fail(where, "is nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(where, "must be a finite number", value)
        return value
    if isinstance(value, (list, tuple)):
        return [_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    return {k: _json(v, f"{where}.{k}", depth + 1) for k, v in _obj(value, where).items()}


# --------------------------------------------------------------------------------------------- architectures


def _refused(option: str) -> bool:
    """Whether an architecture option reads files, downloads or selects code (``_name_or_path`` is a label only)."""
    return option != "_name_or_path" and _REFUSED_OPTION.search(option) is not None


@functools.lru_cache(maxsize=1)
def _timm_options() -> frozenset[str]:
    """Every ``__init__`` parameter of timm's model classes: the architecture options a timm patch may record."""
    import timm.models  # noqa: F401  (imports every model module)
    from torch import nn

    names: set[str] = set()
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("timm.models.") or module is None:
            continue
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module_name:
                try:
                    names.update(inspect.signature(obj.__init__).parameters)
                except (TypeError, ValueError):
                    continue
    return frozenset(names - {"self", "args", "kwargs"})


SPECIAL_TOKEN_FIELDS = frozenset(
    {"pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id"}
)
"""Token ids every config may carry though some configs set them only through ``**kwargs`` (T5's decoder start id,
which its forward needs)."""


def _transformers_options(class_name: str) -> frozenset[str]:
    """The fields of a transformers model class's config (its defaults and ``__init__`` parameters)."""
    import transformers

    cls = getattr(transformers, class_name, None)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise _fail("source.architecture.class", "is not a transformers model class", class_name)
    names = set(config_class().to_dict()) | SPECIAL_TOKEN_FIELDS
    for klass in config_class.__mro__:
        if "__init__" in vars(klass):
            names.update(inspect.signature(klass.__init__).parameters)
    return frozenset(names - {"self", "args", "kwargs"})


def check_architecture(architecture: Any, where: str = "source.architecture") -> dict:
    """Check a recorded source architecture: known family, options from that family's allowlist only.

    Args:
        architecture: ``{"family": "timm", "name", "kwargs"}`` or ``{"family": "transformers", "class", "config"}``.
        where: field name for error messages.

    Returns:
        The architecture as a plain dict (JSON values).

    Raises:
        PatchFormatError: an unknown family, a missing field, or an option that is not an architecture field of the
            family or that reads files, downloads or selects code (``checkpoint_path``, ``pretrained``, ``auto_map``,
            ``_attn_implementation``, ...).
    """
    data = _obj(architecture, where)
    family = _literal(data.get("family"), f"{where}.family", _FAMILIES)
    if family == "timm":
        name = _str(data.get("name"), f"{where}.name")
        options = dict(_obj(data.get("kwargs", {}), f"{where}.kwargs"))
        allowed = _timm_options()
        result = {"family": family, "name": name, "kwargs": options}
        key = "kwargs"
    else:
        name = _str(data.get("class"), f"{where}.class")
        if not name.endswith(("ForImageClassification", "ForSequenceClassification")):
            raise _fail(
                f"{where}.class", "must be a transformers *ForImageClassification / *ForSequenceClassification", name
            )
        options = dict(_obj(data.get("config"), f"{where}.config"))
        allowed = _transformers_options(name)
        result = {"family": family, "class": name, "config": options}
        key = "config"
    refused = sorted(k for k in options if _refused(k) or k not in allowed)
    if refused:
        raise _fail(
            f"{where}.{key}",
            f"has options a patch may not set (not architecture fields, or they read files, download "
            f"or select code): {refused[:10]}",
        )
    result[key] = _json(options, f"{where}.{key}")
    return result


def clean_architecture(architecture: Mapping[str, Any]) -> dict:
    """An architecture recorded from a live model, without the options a patch may not carry (applied on save)."""
    key = "kwargs" if architecture.get("family") == "timm" else "config"
    options = {k: v for k, v in dict(architecture.get(key) or {}).items() if not _refused(k)}
    return json.loads(json.dumps({**architecture, key: options}))  # JSON types: id2label keys become strings


# --------------------------------------------------------------------------------------------- the specs


@dataclass(frozen=True)
class FeatureSpec:
    """Shape facts about one feature, enough to convert it.

    Attributes:
        layout: ``"NCHW"``, ``"NHWC"`` or ``"NLC"``.
        shape: shape without the batch dimension.
        channels: width (channels or hidden size).
        grid: spatial grid ``(H, W)`` for maps and image tokens; ``None`` for text tokens.
        prefix: number of leading non-grid tokens (``NLC`` only).
    """

    layout: Layout
    shape: tuple[int, ...]
    channels: int
    grid: tuple[int, int] | None
    prefix: int = 0

    def to_dict(self) -> dict:
        return {
            "layout": self.layout,
            "shape": list(self.shape),
            "channels": self.channels,
            "grid": list(self.grid) if self.grid else None,
            "prefix": self.prefix,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "feature") -> FeatureSpec:
        data = _obj(data, where)
        grid = data.get("grid")
        if grid is not None:
            grid = tuple(_int(g, f"{where}.grid", 1, MAX_DIM) for g in _list(grid, f"{where}.grid", 2))
            if len(grid) != 2:
                raise _fail(f"{where}.grid", "must be [H, W] or null", list(grid))
        return cls(
            layout=_literal(data.get("layout"), f"{where}.layout", _LAYOUTS),
            shape=_shape(data.get("shape"), f"{where}.shape"),
            channels=_int(data.get("channels"), f"{where}.channels", 1, MAX_DIM),
            grid=grid,
            prefix=_int(data.get("prefix", 0), f"{where}.prefix", 0, MAX_DIM),
        )


@dataclass(frozen=True)
class PointSpec:
    """A cut or insertion point as recorded (see :class:`pnc_surgery.Point`)."""

    name: str
    index: int
    shape: tuple[int, ...]
    layout: Layout
    reduction: int | None
    width: int

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "index": self.index,
            "shape": list(self.shape),
            "layout": self.layout,
            "reduction": self.reduction,
            "width": self.width,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "point") -> PointSpec:
        data = _obj(data, where)
        reduction = data.get("reduction")
        return cls(
            name=_str(data.get("name"), f"{where}.name"),
            index=_int(data.get("index"), f"{where}.index"),
            shape=_shape(data.get("shape"), f"{where}.shape"),
            layout=_literal(data.get("layout"), f"{where}.layout", _LAYOUTS),
            reduction=None if reduction is None else _int(reduction, f"{where}.reduction", 1, MAX_DIM),
            width=_int(data.get("width"), f"{where}.width", 1, MAX_DIM),
        )


@dataclass(frozen=True)
class SourceSpec:
    """The model the classes come from: an id for people, and an architecture to rebuild its tail (no weights).

    Attributes:
        id: the source's Hub id or name.
        architecture: see :func:`check_architecture`.
    """

    id: str
    architecture: Mapping[str, Any]

    def to_dict(self) -> dict:
        return {"id": self.id, "architecture": dict(self.architecture)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "source") -> SourceSpec:
        data = _obj(data, where)
        return cls(
            _str(data.get("id"), f"{where}.id"), check_architecture(data.get("architecture"), f"{where}.architecture")
        )


@dataclass(frozen=True)
class TargetFingerprint:
    """What attach checks on a target: identity, the insertion module, shapes, and a digest of its weights.

    Attributes:
        id: the target's Hub id or name.
        family: ``"timm"`` or ``"transformers"``.
        class_name: the target's class (``"class"`` in the JSON).
        num_classes: how many classes the target scores.
        insertion_type: class of the module at the insertion point.
        parameter_shapes: the insertion module's parameter shapes, by name.
        feature_shape: the insertion feature's shape without the batch dimension.
        classifiers: the target's classifier modules whose inputs the gate reads.
        pre_logits_width: total width of those inputs.
        weights_sample: the target's parameters at fixed sampled positions (see
            :func:`pnc_surgery.patch.build.weights_sample`); ``None``: not recorded (format 1).
    """

    id: str
    family: Family
    class_name: str
    num_classes: int
    insertion_type: str
    parameter_shapes: Mapping[str, tuple[int, ...]]
    feature_shape: tuple[int, ...]
    classifiers: tuple[str, ...] = ()
    pre_logits_width: int = 0
    weights_sample: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "family": self.family,
            "class": self.class_name,
            "num_classes": self.num_classes,
            "insertion_type": self.insertion_type,
            "parameter_shapes": {k: list(v) for k, v in self.parameter_shapes.items()},
            "feature_shape": list(self.feature_shape),
            "classifiers": list(self.classifiers),
            "pre_logits_width": self.pre_logits_width,
            "weights_sample": None if self.weights_sample is None else list(self.weights_sample),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "target") -> TargetFingerprint:
        data = _obj(data, where)
        shapes = _obj(data.get("parameter_shapes"), f"{where}.parameter_shapes")
        if len(shapes) > MAX_CLASSES:
            raise _fail(f"{where}.parameter_shapes", f"has more than {MAX_CLASSES} entries")
        return cls(
            id=_str(data.get("id"), f"{where}.id"),
            family=_literal(data.get("family"), f"{where}.family", _FAMILIES),
            class_name=_str(data.get("class"), f"{where}.class"),
            num_classes=_int(data.get("num_classes"), f"{where}.num_classes", 1, MAX_CLASSES),
            insertion_type=_str(data.get("insertion_type"), f"{where}.insertion_type"),
            parameter_shapes={
                _str(k, f"{where}.parameter_shapes"): tuple(
                    _int(d, f"{where}.parameter_shapes.{k}", 0, MAX_COUNT)
                    for d in _list(v, f"{where}.parameter_shapes.{k}", MAX_DIMS)
                )
                for k, v in shapes.items()
            },
            feature_shape=_shape(data.get("feature_shape"), f"{where}.feature_shape"),
            classifiers=_names(data.get("classifiers", []), f"{where}.classifiers", 64),
            pre_logits_width=_int(data.get("pre_logits_width", 0), f"{where}.pre_logits_width", 0, MAX_DIM),
            weights_sample=_floats(data.get("weights_sample"), f"{where}.weights_sample"),
        )


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter's shapes: the target's feature at the insertion point in, the branch's feature at the cut out, and
    the bottleneck width (0: none)."""

    insertion: FeatureSpec
    cut: FeatureSpec
    hidden: int = 0

    def to_dict(self) -> dict:
        return {"insertion": self.insertion.to_dict(), "cut": self.cut.to_dict(), "hidden": self.hidden}

    @classmethod
    def from_dict(cls, data: Any, where: str = "adapter", format_version: int = FORMAT_VERSION) -> AdapterSpec:
        """Read an adapter spec; format 1 named the two features ``source`` and ``dest``."""
        data = _obj(data, where)
        insertion_key, cut_key = ("source", "dest") if format_version == 1 else ("insertion", "cut")
        return cls(
            FeatureSpec.from_dict(data.get(insertion_key), f"{where}.{insertion_key}"),
            FeatureSpec.from_dict(data.get(cut_key), f"{where}.{cut_key}"),
            _int(data.get("hidden", 0), f"{where}.hidden", 0, MAX_DIM),
        )


@dataclass(frozen=True)
class BranchSpec:
    """What rebuilds the cloned source tail from the source architecture (see :class:`pnc_surgery.Branch`).

    Attributes:
        family: the source's family.
        cut: the source module where the tail starts; ``cut_shape`` its feature shape.
        cut_extras: where the cut module returns a tuple that leads with the feature, its other elements as
            constants (numbers, lists of them, ``null`` for tensors the tail does not read) or, for a tensor the
            module passed on from its arguments (a position bias), ``{"argument": position or keyword}``; ``None``
            otherwise.
        main_input_name: the source's data input (``"x"``, ``"pixel_values"``, ``"input_ids"``).
        context_keys: the other inputs the tail reads (``attention_mask``).
        input_shape, input_dtype: one example of the data input.
        text_ids: for token inputs, the ids of the tail's stand-in input: ``{"filler", "pad", "eos"}`` (pad under
            the mask, eos at each text's end, either ``null`` when unused); ``None``: all zeros (files before it).
        stubs: modules before the cut replaced by placeholders: ``{name: {"shape", "dtype", "stored"}}``.
        classifiers: the tail's classifier modules; ``classes`` the source class ids they score.
        overrides: shape attributes changed by pruning: ``{module: {attribute: int or [int]}}``.
    """

    family: Family
    cut: str
    cut_shape: tuple[int, ...]
    main_input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    context_keys: tuple[str, ...] = ()
    stubs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    classifiers: tuple[str, ...] = ()
    classes: tuple[int, ...] = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cut_extras: tuple | None = None
    text_ids: Mapping[str, int | None] | None = None

    def to_dict(self) -> dict:
        optional = {"cut_extras": self.cut_extras, "text_ids": self.text_ids}
        return {
            "family": self.family,
            "cut": self.cut,
            "cut_shape": list(self.cut_shape),
            "main_input_name": self.main_input_name,
            "context_keys": list(self.context_keys),
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
            "stubs": {k: dict(v) for k, v in self.stubs.items()},
            "classifiers": list(self.classifiers),
            "classes": list(self.classes),
            "overrides": {k: dict(v) for k, v in self.overrides.items()},
            **{k: (list(v) if isinstance(v, tuple) else dict(v)) for k, v in optional.items() if v is not None},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "branch") -> BranchSpec:
        data = _obj(data, where)
        stubs = {}
        for name, stub in _obj(data.get("stubs", {}), f"{where}.stubs").items():
            stub = _obj(stub, f"{where}.stubs.{name}")
            stored = stub.get("stored", False)
            if not isinstance(stored, bool):
                raise _fail(f"{where}.stubs.{name}.stored", "must be true or false", stored)
            stubs[name] = {
                "shape": list(_shape(stub.get("shape"), f"{where}.stubs.{name}.shape")),
                "dtype": _literal(stub.get("dtype"), f"{where}.stubs.{name}.dtype", _DTYPES),
                "stored": stored,
            }
        overrides = {}
        for name, attrs in _obj(data.get("overrides", {}), f"{where}.overrides").items():
            values = {}
            for attr, value in _obj(attrs, f"{where}.overrides.{name}").items():
                spot = f"{where}.overrides.{name}.{attr}"
                values[attr] = (
                    [_int(v, spot, 0, MAX_DIM) for v in _list(value, spot, MAX_DIMS)]
                    if isinstance(value, (list, tuple))
                    else _int(value, spot, 0, MAX_DIM)
                )
            overrides[name] = values
        input_shape = _list(data.get("input_shape"), f"{where}.input_shape", MAX_DIMS)
        cut_shape = _shape(data.get("cut_shape"), f"{where}.cut_shape")
        extras = data.get("cut_extras")
        text_ids = data.get("text_ids")
        return cls(
            family=_literal(data.get("family"), f"{where}.family", _FAMILIES),
            cut=_str(data.get("cut"), f"{where}.cut"),
            cut_shape=cut_shape,
            cut_extras=None if extras is None else tuple(_constants(extras, f"{where}.cut_extras", max(cut_shape))),
            text_ids=None if text_ids is None else _text_ids(text_ids, f"{where}.text_ids"),
            main_input_name=_str(data.get("main_input_name"), f"{where}.main_input_name"),
            input_shape=_shape(input_shape, f"{where}.input_shape") if input_shape else (),
            input_dtype=_literal(data.get("input_dtype"), f"{where}.input_dtype", _DTYPES),
            context_keys=_names(data.get("context_keys", []), f"{where}.context_keys", 16),
            stubs=stubs,
            classifiers=_names(data.get("classifiers", []), f"{where}.classifiers", 64),
            classes=tuple(
                _int(c, f"{where}.classes", 0, MAX_COUNT)
                for c in _list(data.get("classes", []), f"{where}.classes", MAX_CLASSES)
            ),
            overrides=overrides,
        )


@dataclass(frozen=True)
class GateSpec:
    """The gate's kind and sizes (see :class:`pnc_surgery.gate.Gate`)."""

    kind: GateKind
    num_features: int
    num_components: int = 2
    num_positive: int = 1
    space_widths: tuple[int, ...] = ()
    """For ``"novelty"`` gates: the width of each space the gate measures distances in (0: unused)."""
    space_ranks: tuple[int, ...] = ()
    """For ``"novelty"`` gates: the leading directions each space keeps (0, or absent: a full precision matrix)."""

    def to_dict(self) -> dict:
        data: dict[str, Any] = {
            "kind": self.kind,
            "num_features": self.num_features,
            "num_components": self.num_components,
            "num_positive": self.num_positive,
        }
        if self.kind == "novelty":
            data["space_widths"] = list(self.space_widths)
            if any(self.space_ranks):
                data["space_ranks"] = list(self.space_ranks)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "gate") -> GateSpec:
        data = _obj(data, where)
        spec = cls(
            kind=_literal(data.get("kind"), f"{where}.kind", _GATE_KINDS),
            num_features=_int(data.get("num_features"), f"{where}.num_features", 0, MAX_DIM),
            num_components=_int(data.get("num_components", 2), f"{where}.num_components", 2, MAX_CLASSES),
            num_positive=_int(data.get("num_positive", 1), f"{where}.num_positive", 1, MAX_CLASSES),
            space_widths=tuple(
                _int(w, f"{where}.space_widths[{i}]", 0, MAX_DIM)
                for i, w in enumerate(_list(data.get("space_widths", []), f"{where}.space_widths", len(SPACES)))
            ),
            space_ranks=tuple(
                _int(r, f"{where}.space_ranks[{i}]", 0, MAX_DIM)
                for i, r in enumerate(_list(data.get("space_ranks", []), f"{where}.space_ranks", len(SPACES)))
            ),
        )
        if spec.kind == "novelty" and len(spec.space_widths) != len(SPACES):
            raise _fail(f"{where}.space_widths", f"a novelty gate records {len(SPACES)} widths", spec.space_widths)
        if spec.space_ranks and (
            len(spec.space_ranks) != len(spec.space_widths)
            or any(not 0 <= r < max(w, 1) for r, w in zip(spec.space_ranks, spec.space_widths))
        ):
            raise _fail(f"{where}.space_ranks", "one rank per space, each below its width", spec.space_ranks)
        if spec.num_positive >= spec.num_components:
            raise _fail(f"{where}.num_positive", "must be below num_components", spec.num_positive)
        return spec


@dataclass(frozen=True)
class PatchConfig:
    """Everything ``patch_config.json`` holds.

    Attributes:
        source: the source model (id and architecture).
        cut: where the cloned part of the source starts.
        insertion: the target module whose output feeds it.
        target: the fingerprint attach checks.
        class_ids: source class ids of the cloned classes, in output order; ``class_names`` their names.
        adapter, branch, gate: the shapes that rebuild the patch's modules.
        tensors_sha256: digest of the patch's tensors, so a folder whose files come from two saves is refused
            (``None``: not recorded, format 1).
        num_parameters: parameters the patch adds (informational).
        metrics: what was measured while cloning (JSON values).
        versions: library versions that made the patch.
        search: the (cut, insertion) ranking of the search (JSON rows).
        clone_config: the :class:`pnc_surgery.CloneConfig` used (JSON).
        format_version: the format version of the file this config was read from (files are always written in
            :data:`FORMAT_VERSION`).
    """

    source: SourceSpec
    cut: PointSpec
    insertion: PointSpec
    target: TargetFingerprint
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    adapter: AdapterSpec
    branch: BranchSpec
    gate: GateSpec
    tensors_sha256: str | None = None
    num_parameters: int = 0
    metrics: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    search: tuple[Mapping[str, Any], ...] = ()
    clone_config: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        """The JSON object of ``patch_config.json`` (format :data:`FORMAT_VERSION`)."""
        data = {
            "format_version": FORMAT_VERSION,
            "source": self.source.to_dict(),
            "cut": self.cut.to_dict(),
            "insertion": self.insertion.to_dict(),
            "target": self.target.to_dict(),
            "classes": {"ids": list(self.class_ids), "names": list(self.class_names)},
            "adapter": self.adapter.to_dict(),
            "branch": self.branch.to_dict(),
            "gate": self.gate.to_dict(),
            "tensors_sha256": self.tensors_sha256,
            "num_parameters": self.num_parameters,
            "metrics": dict(self.metrics),
            "versions": dict(self.versions),
            "search": [dict(row) for row in self.search],
            "clone_config": dict(self.clone_config),
        }
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "patch config") -> PatchConfig:
        """Check an untrusted config and build it; raises :class:`PatchFormatError` naming what is wrong.

        Args:
            data: the decoded JSON.
            where: the file, for error messages.
        """
        try:
            return cls._from_dict(data)
        except PatchFormatError as exc:
            raise PatchFormatError(f"{where}: {exc}") from None
        except RecursionError:
            raise PatchFormatError(f"{where}: the config is nested too deeply") from None

    @classmethod
    def _from_dict(cls, data: Any) -> PatchConfig:
        if not isinstance(data, Mapping):
            raise PatchFormatError(f"expected a JSON object, got {type(data).__name__}")
        missing = [
            k
            for k in ("format_version", "source", "cut", "target", "insertion", "classes", "adapter", "gate")
            if k not in data
        ]
        if missing:
            raise PatchFormatError(f"missing keys {missing}; is this a pnc_surgery patch?")
        version = data["format_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PatchFormatError(f"format_version must be a positive integer, got {_short_repr(version)}")
        if version > FORMAT_VERSION:
            raise PatchFormatError(
                f"format_version {version} is newer than this pnc_surgery understands ({FORMAT_VERSION}); "
                "upgrade pnc_surgery to load it"
            )
        if "branch" not in data:
            raise PatchFormatError("missing keys ['branch']; is this a pnc_surgery patch?")
        classes = _obj(data["classes"], "classes")
        ids = tuple(_int(c, "classes.ids", 0, MAX_COUNT) for c in _list(classes.get("ids"), "classes.ids", MAX_CLASSES))
        names = _names(classes.get("names", []), "classes.names")
        if not ids or len(names) != len(ids) or len(set(ids)) != len(ids):
            raise _fail(
                "classes", f"needs as many names as ids ({len(ids)} ids, {len(names)} names), at least one, no repeats"
            )
        search = data.get("search", [])
        config = cls(
            source=SourceSpec.from_dict(data["source"]),
            cut=PointSpec.from_dict(data["cut"], "cut"),
            insertion=PointSpec.from_dict(data["insertion"], "insertion"),
            target=TargetFingerprint.from_dict(data["target"]),
            class_ids=ids,
            class_names=names,
            adapter=AdapterSpec.from_dict(data["adapter"], format_version=version),
            branch=BranchSpec.from_dict(data["branch"]),
            gate=GateSpec.from_dict(data["gate"]),
            tensors_sha256=_hex(data.get("tensors_sha256"), "tensors_sha256"),
            num_parameters=_int(data.get("num_parameters", 0), "num_parameters"),
            metrics=_json(_obj(data.get("metrics", {}), "metrics"), "metrics"),
            versions={k: _str(v, f"versions.{k}") for k, v in _obj(data.get("versions", {}), "versions").items()},
            search=tuple(_json(_obj(row, "search"), "search") for row in _list(search, "search", 10_000)),
            clone_config=_json(_obj(data.get("clone_config", {}), "clone_config"), "clone_config"),
            format_version=version,
        )
        config._check_consistent()
        return config

    def _check_consistent(self) -> None:
        """Fields that describe the same thing must agree (the loader relies on it before building anything)."""
        target, adapter, branch = self.target, self.adapter, self.branch
        checks: list[tuple[bool, str]] = [
            (
                adapter.insertion.shape == target.feature_shape
                or (adapter.insertion.layout == "NLC" and adapter.insertion.grid is None),
                "adapter.insertion.shape must equal target.feature_shape",
            ),
            (adapter.cut.shape == branch.cut_shape, "adapter.cut.shape must equal branch.cut_shape"),
            (
                adapter.insertion.shape == self.insertion.shape or adapter.insertion.grid is None,
                "adapter.insertion.shape must equal insertion.shape",
            ),
            (branch.cut == self.cut.name, "branch.cut must equal cut.name"),
            (
                branch.family == self.source.architecture["family"],
                "branch.family must equal source.architecture.family",
            ),
            (tuple(branch.classes) == self.class_ids, "branch.classes must equal classes.ids"),
            (
                self.gate.kind != "novelty" or self.gate.space_widths[-1] in (0, adapter.insertion.channels),
                "gate.space_widths must end with adapter.insertion.channels (the pooled insertion feature)",
            ),
            (
                self.gate.kind == "none"
                or self.gate.num_positive <= len(self.class_ids)
                or self.gate.num_positive == 1,
                "gate.num_positive cannot exceed the cloned classes",
            ),
        ]
        bad = [message for ok, message in checks if not ok]
        if bad:
            raise PatchFormatError("inconsistent config: " + "; ".join(bad))
