"""Patch: the cloned branch, its adapter and gate, attached to a target through forward hooks only.

While attached, ``target(x)`` returns the target's own logits followed by the cloned classes' logits (a
tensor for timm models, the same ``ModelOutput`` with wider ``logits`` for transformers models). The patch
is never registered as a submodule of the target, so the target's ``state_dict()``, parameters and buffers
are untouched; detaching removes the hooks and the target is exactly the model it was.

Three hooks do the work: a pre-hook on the target records its keyword inputs (attention masks), a hook on
the insertion module runs adapter and branch on the (detached) feature, and an always-called hook on the
target appends the gated scores to the logits and clears the per-call state, even when the forward raises.
Hooks present when a model is compiled with ``torch.compile`` are traced in; attach before compiling.
"""
from __future__ import annotations

import copy
import inspect
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import files
from .adapters import Adapter, feature_spec
from .backends import ModelInputs, backend_for
from .backends.base import image_size
from .branch import SourceTail
from .errors import InvalidInputError, PatchFormatError, PatchMismatchError, PatchStateError, PncError, UnsupportedModelError
from .evidence import branch_outputs, patch_gate_inputs
from .gate import Gate
from .points import Point, resolve_example_input
from .tracing import classifier_names, eval_mode, trace_model

__all__ = ["Patch", "target_fingerprint"]


def _versions() -> dict:
    import timm
    import transformers

    from . import __version__

    return {"pnc_surgery": __version__, "torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__}


def target_fingerprint(target: nn.Module, insertion: Point, example_input: ModelInputs | None = None) -> dict:
    """What a patch checks on attach: the target's identity, insertion module, parameter shapes and feature shape."""
    backend = backend_for(target)
    module = target.get_submodule(insertion.name)
    inputs = resolve_example_input(target, example_input, backend)
    with eval_mode(target):
        trace = trace_model(target, inputs, backend)
        num_classes = int(trace.logits.shape[-1])
        classifiers = classifier_names(trace, num_classes, after=trace.calls[insertion.name].post)
        pre_logits = trace_model(target, inputs, backend, classifiers=classifiers).pre_logits
    return {
        "id": backend.identity(target),
        "family": backend.family,
        "class": type(target).__name__,
        "num_classes": int(num_classes),
        "insertion_type": type(module).__name__,
        "parameter_shapes": {name: list(p.shape) for name, p in module.named_parameters()},
        "feature_shape": list(insertion.shape),
        "classifiers": classifiers,
        "pre_logits_width": 0 if pre_logits is None else int(pre_logits.shape[1]),
    }


class Patch(nn.Module):
    """Cloned classes for a target model: branch + adapter + gate + metadata.

    Make one with :func:`pnc_surgery.clone` (learned) or :meth:`assemble` (by hand), load one with
    :meth:`from_pretrained` or :meth:`load`.

    Args:
        branch: the source tail (pruned, with the cloned classes' head rows).
        adapter: target feature at the insertion point -> branch input.
        gate: how the cloned scores compete with the target's.
        config: metadata (see ``patch_config.json``); the parts that rebuild the modules are refreshed from them.
    """

    def __init__(self, branch: SourceTail, adapter: Adapter, gate: Gate, config: dict) -> None:
        super().__init__()
        self.branch, self.adapter, self.gate = branch, adapter, gate
        self.config = dict(config)
        self._handles: list[Any] = []
        self._target: list[nn.Module] = []  # a list, so the target is never registered as a submodule
        self._state: dict[str, Any] = {}
        self._signature: inspect.Signature | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def assemble(
        cls,
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
    ) -> "Patch":
        """Build an untrained patch by hand: the source tail from ``cut``, an identity-where-possible adapter.

        Args:
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
        from .points import find_points

        source_backend, target_backend = backend_for(source), backend_for(target)
        source_input = resolve_example_input(source, source_input, source_backend)
        target_input = resolve_example_input(target, target_input, target_backend)
        cut_point = _as_point(source, cut, source_input, find_points)
        insertion_point = _as_point(target, insertion, target_input, find_points)
        branch = SourceTail.from_model(source, cut_point, source_input)
        all_classes = list(branch.classes)
        classes = list(all_classes if classes is None else classes)
        unknown = [c for c in classes if c not in all_classes]
        if not classes or unknown:
            raise InvalidInputError(f"classes {unknown or classes} are not classes of the source (it has {len(all_classes)})")
        branch.keep_classes(classes)
        adapter = Adapter(
            feature_spec(insertion_point, image_size(target_input)),
            feature_spec(cut_point, image_size(source_input)),
            hidden=adapter_hidden,
        )
        return cls.compose(
            source, target, cut_point, insertion_point, branch, adapter, gate,
            class_names=class_names, target_input=target_input, source_kwargs=source_kwargs,
        )

    @classmethod
    def compose(
        cls,
        source: nn.Module,
        target: nn.Module,
        cut: Point,
        insertion: Point,
        branch: SourceTail,
        adapter: Adapter,
        gate: Gate | str,
        *,
        class_names: Sequence[str] | None = None,
        target_input: ModelInputs | None = None,
        source_kwargs: Mapping[str, Any] | None = None,
    ) -> "Patch":
        """A patch from ready parts, with the metadata (source architecture, target fingerprint) filled in."""
        source_backend = backend_for(source)
        classes = list(branch.classes)
        names = list(class_names) if class_names is not None else _class_names(source_backend.class_names(source), classes)
        fingerprint = target_fingerprint(target, insertion, target_input)
        if isinstance(gate, str):
            gate = Gate.unfitted(gate, fingerprint["num_classes"], len(classes), fingerprint["pre_logits_width"])
        config = {
            "format_version": files.FORMAT_VERSION,
            "source": {"id": source_backend.identity(source), "architecture": source_backend.architecture(source, **dict(source_kwargs or {}))},
            "cut": cut.to_dict(),
            "target": fingerprint,
            "insertion": insertion.to_dict(),
            "classes": {"ids": [int(c) for c in classes], "names": [str(n) for n in names]},
            "metrics": {},
            "versions": _versions(),
        }
        return cls(branch, adapter, gate, config)

    # ------------------------------------------------------------------ description
    @property
    def class_ids(self) -> list[int]:
        """Source class ids of the cloned classes, in output order."""
        return list(self.config["classes"]["ids"])

    @property
    def class_names(self) -> list[str]:
        """Names of the cloned classes, in output order."""
        return list(self.config["classes"]["names"])

    @property
    def metrics(self) -> dict:
        """What was measured while cloning (accuracies, kept ratio, chosen points, time)."""
        return self.config.setdefault("metrics", {})

    @property
    def num_parameters(self) -> int:
        """Parameters the patch adds to the target."""
        return sum(p.numel() for p in self.parameters())

    @property
    def _model(self) -> nn.Module | None:
        """The target this patch is attached to (kept outside the module tree: never moved, saved or counted)."""
        return self._target[0] if self._target else None

    @property
    def is_attached(self) -> bool:
        return self._model is not None

    def full_config(self) -> dict:
        """The JSON that :meth:`save_pretrained` writes (module specs refreshed from the live modules)."""
        config = copy.deepcopy(self.config)
        config.update(
            format_version=files.FORMAT_VERSION,
            branch=self.branch.spec(),
            adapter=self.adapter.spec(),
            gate=self.gate.spec(),
            num_parameters=self.num_parameters,
        )
        return config

    def summary(self) -> str:
        """A few lines saying what this patch is and where it stands."""
        state = f"attached to {type(self._model).__name__}" if self._model is not None else "detached"
        lines = [
            f"Patch ({state}): {len(self.class_ids)} classes {self.class_names} from {self.config['source']['id']}",
            f"  cut {self.config['cut']['name']} {tuple(self.config['cut']['shape'])} -> insertion "
            f"{self.config['insertion']['name']} {tuple(self.config['insertion']['shape'])} of {self.config['target']['id']}",
            f"  {self.num_parameters:,} parameters, gate {self.gate.kind}",
        ]
        if self.metrics:
            lines.append("  metrics: " + ", ".join(f"{k}={_short(v)}" for k, v in self.metrics.items()))
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"classes={self.class_names}, cut={self.config['cut']['name']!r}, insertion={self.config['insertion']['name']!r}"

    # ------------------------------------------------------------------ attach / detach
    def check(self, model: nn.Module, strict: bool = True) -> None:
        """Raise :class:`PatchMismatchError` if this patch does not fit ``model`` (nothing is changed)."""
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"attach needs a torch.nn.Module, got {type(model).__name__}")
        fingerprint, insertion = self.config["target"], self.config["insertion"]["name"]
        try:
            module = model.get_submodule(insertion)
        except AttributeError:
            raise PatchMismatchError(
                f"{type(model).__name__} has no module {insertion!r}; this patch was made for {fingerprint['id']} "
                f"({fingerprint['class']})"
            ) from None
        problems = []
        backend = backend_for(model)
        modules = dict(model.named_modules())
        missing = [name for name in fingerprint.get("classifiers", []) if name not in modules]
        if missing:
            raise PatchMismatchError(f"{type(model).__name__} has no classifier modules {missing}; the patch reads their inputs")
        if type(model).__name__ != fingerprint["class"]:
            problems.append(f"model class is {type(model).__name__}, the patch was made for {fingerprint['class']}")
        if type(module).__name__ != fingerprint["insertion_type"]:
            problems.append(f"module {insertion!r} is a {type(module).__name__}, the patch expects a {fingerprint['insertion_type']}")
        shapes = {name: list(p.shape) for name, p in module.named_parameters()}
        for name, shape in fingerprint["parameter_shapes"].items():
            if shapes.get(name) != shape:
                problems.append(
                    f"module {insertion!r}: parameter {name!r} has shape {tuple(shapes[name]) if name in shapes else None}, "
                    f"the patch expects {tuple(shape)} (feature shape {tuple(fingerprint['feature_shape'])})"
                )
                break
        num_classes = backend.num_classes(model)
        if num_classes is not None and num_classes != fingerprint["num_classes"]:
            problems.append(f"model scores {num_classes} classes, the patch was made for {fingerprint['num_classes']}")
        shape_problems = [p for p in problems if "shape" in p or "scores" in p or "is a" in p]
        if shape_problems:
            raise PatchMismatchError("patch does not fit this model: " + "; ".join(shape_problems))
        identity = backend.identity(model)
        if identity != fingerprint["id"]:
            problems.append(f"target id is {identity!r}, the patch was made for {fingerprint['id']!r}")
        if problems:
            message = "patch was made for another target: " + "; ".join(problems)
            if strict:
                raise PatchMismatchError(message + " (attach with strict=False to use it anyway, shapes fit)")
            warnings.warn(message, stacklevel=3)

    def attach(self, model: nn.Module, strict: bool = True) -> nn.Module:
        """Hook this patch into ``model``; returns ``model``, whose outputs now include the cloned classes.

        Args:
            model: the target (its parameters, buffers and ``state_dict`` stay untouched).
            strict: refuse a model whose id or class differs from the one the patch was made for (shapes are
                always checked).
        """
        if self._model is not None:
            raise PatchStateError(f"this patch is already attached to a {type(self._model).__name__}; detach() it first")
        self.check(model, strict=strict)
        backend = backend_for(model)
        insertion = model.get_submodule(self.config["insertion"]["name"])
        self._signature = inspect.signature(model.forward) if self.branch.context_keys else None
        handles = []
        try:
            handles.append(model.register_forward_pre_hook(self._on_call, with_kwargs=True))
            handles.append(insertion.register_forward_hook(self._on_insertion))
            for name in self.config["target"].get("classifiers", []):
                handles.append(model.get_submodule(name).register_forward_pre_hook(self._on_classifier))
            handles.append(model.register_forward_hook(lambda m, a, o: self._on_output(backend, o), always_call=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        self._handles, self._target, self._state = handles, [model], {}
        return model

    def detach(self) -> nn.Module | None:
        """Remove every hook; the model is exactly what it was. Safe to call twice. Returns the model."""
        model = self._model
        for handle in self._handles:
            handle.remove()
        self._handles, self._target, self._state = [], [], {}
        return model

    @contextmanager
    def attached(self, model: nn.Module, strict: bool = True) -> Iterator[nn.Module]:
        """``with patch.attached(model): model(x)`` attaches for the block and always detaches."""
        self.attach(model, strict=strict)
        try:
            yield model
        finally:
            self.detach()

    def _on_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        context: dict[str, Any] = {}
        if self._signature is not None:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
            context = {k: bound[k] for k in self.branch.context_keys if bound.get(k) is not None}
        self._state = {"context": context}

    def _on_insertion(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._state
        if "branch_logits" in state or "context" not in state:
            return
        if not isinstance(output, torch.Tensor):
            raise PatchMismatchError(f"insertion module {self.config['insertion']['name']!r} returned {type(output).__name__}, not a tensor")
        expected = tuple(self.config["target"]["feature_shape"])
        got = tuple(output.shape[1:])
        text = self.adapter.source.grid is None and self.adapter.source.layout == "NLC"
        if got != expected and not (text and len(got) == 2 and got[1] == expected[1]):
            raise PatchMismatchError(
                f"insertion module {self.config['insertion']['name']!r} produced features of shape {got}; "
                f"the patch expects {expected}"
            )
        feature = output.detach()
        self._follow(feature)
        context = {k: v for k, v in state["context"].items()}
        state["branch_logits"], state["branch_features"] = branch_outputs(self.branch, self.adapter(feature), **context)

    def _on_classifier(self, module: nn.Module, args: tuple) -> None:
        if "context" in self._state and args and isinstance(args[0], torch.Tensor):
            self._state.setdefault("pre_logits", []).append(args[0].detach().flatten(1))

    def _pre_logits(self, state: dict, batch: int, like: torch.Tensor) -> torch.Tensor:
        parts = state.get("pre_logits") or []
        width = int(self.config["target"].get("pre_logits_width", 0))
        merged = torch.cat(parts, dim=1) if parts else like.new_zeros(batch, 0)
        if merged.shape[1] != width:
            raise PatchMismatchError(f"the target's classifier input has {merged.shape[1]} features; the patch expects {width}")
        return merged

    def _on_output(self, backend: Any, output: Any) -> Any:
        state, self._state = self._state, {}
        if output is None:
            return None
        if "branch_logits" not in state:
            raise PatchMismatchError(
                f"insertion module {self.config['insertion']['name']!r} was not called during the forward; "
                "the patch cannot add its classes"
            )
        logits = backend.logits(output)
        own = logits[..., : self.config["target"]["num_classes"]].detach()
        pre_logits = self._pre_logits(state, own.shape[0], own)
        scores = self.gate(own, state["branch_logits"], pre_logits, state["branch_features"])
        return backend.with_logits(output, torch.cat([logits, scores.to(logits.dtype)], dim=-1))

    def _follow(self, feature: torch.Tensor) -> None:
        """Move the patch to the device and floating dtype of the target's features."""
        weight = self.adapter.proj.weight
        if weight.device != feature.device or (feature.is_floating_point() and weight.dtype != feature.dtype):
            self.to(device=feature.device, dtype=feature.dtype if feature.is_floating_point() else None)

    def forward(
        self, feature: torch.Tensor, target_logits: torch.Tensor, pre_logits: torch.Tensor, **context: torch.Tensor
    ) -> torch.Tensor:
        """Cloned-class logits from the target's feature at the insertion point, its logits and pre-logits (what the hooks compute)."""
        return self.gate(*patch_gate_inputs(self, feature, target_logits, pre_logits, **context))

    # ------------------------------------------------------------------ files
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer (non-persistent ones too), as the file stores them."""
        named = dict(self.named_parameters(remove_duplicate=False))
        named.update(self.named_buffers(remove_duplicate=False))
        return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in named.items()}

    def save_pretrained(self, save_directory: str | Path, *, push_to_hub: bool = False, repo_id: str | None = None, **push_kwargs: Any) -> Path:
        """Write ``patch_config.json``, ``patch_model.safetensors`` and a ``README.md`` model card to a folder."""
        from . import hub

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.full_config()
        files.write_tensors(folder / files.WEIGHTS_NAME, self.tensors(), {"format": "pt"})
        files.write_config(folder / files.CONFIG_NAME, config)
        hub.write_model_card(folder, config)
        if push_to_hub:
            if not repo_id:
                raise InvalidInputError("push_to_hub=True needs repo_id")
            hub.push_folder(folder, repo_id, **push_kwargs)
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
    ) -> str:
        """Upload the patch folder to the Hugging Face Hub in one commit; returns the commit (or PR) URL."""
        import tempfile

        from . import hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return hub.push_folder(
                Path(tmp), repo_id, private=private, token=token, revision=revision, create_pr=create_pr, commit_message=commit_message
            )

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | Path,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> "Patch":
        """Load a patch from a local folder or a Hub repo (safetensors + JSON only; no code runs)."""
        from . import hub

        folder = hub.resolve_patch_folder(
            repo_id_or_dir,
            revision=revision,
            subfolder=subfolder,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
        where = str(folder)
        config = files.read_config(folder / files.CONFIG_NAME)
        tensors, _ = files.read_tensors(folder / files.WEIGHTS_NAME)
        return cls._from_parts(config, tensors, where)

    def save(self, path: str | Path) -> Path:
        """Single-file form: tensors in safetensors, the config in its metadata."""
        path = Path(path)
        config = json.dumps(self.full_config(), sort_keys=True)
        files.write_tensors(path, self.tensors(), {"format": "pt", files.METADATA_KEY: config})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Patch":
        """Load the single-file form written by :meth:`save`."""
        tensors, metadata = files.read_tensors(path)
        config = files.decode_embedded_config(metadata, str(path))
        return cls._from_parts(config, tensors, str(path))

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict[str, torch.Tensor], where: str) -> "Patch":
        """Rebuild the modules from the config (source architecture on the meta device) and load the tensors."""
        try:
            patch = cls._rebuild(config, tensors)
        except PncError as exc:
            raise PatchFormatError(f"{where}: {exc}") from None
        except Exception as exc:  # untrusted file: every failure becomes the library's own error
            raise PatchFormatError(f"{where}: the patch does not load ({type(exc).__name__}: {exc})") from None
        return patch

    @classmethod
    def _rebuild(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "Patch":
        for key in ("branch", "adapter", "gate"):
            if not isinstance(config.get(key), dict):
                raise PatchFormatError(f"config has no {key!r} section")
        _check_metadata(config)
        branch = SourceTail.from_spec(config["branch"], config["source"]["architecture"])
        with torch.device("meta"):  # sizes come from the untrusted config: allocate only what the file holds
            adapter = Adapter.from_spec(config["adapter"])
            gate = Gate.from_spec(config["gate"])
        patch = cls(branch, adapter, gate, {k: v for k, v in config.items() if k not in ("branch", "adapter", "gate", "num_parameters")})
        _assign(patch, tensors)
        patch._self_test()
        return patch

    def _self_test(self) -> None:
        """One forward on zeros, so a patch whose tensors do not fit fails at load time, not mid-forward."""
        shape = tuple(self.config["target"]["feature_shape"])
        feature = torch.zeros(1, *shape, dtype=self.adapter.proj.weight.dtype)
        context = {}
        if "attention_mask" in self.branch.context_keys:
            mask = torch.ones(1, shape[0], dtype=torch.long)
            mask[0, 1:] = 0  # padding, so the mask is used (an all-ones mask is dropped) and its length checked
            context["attention_mask"] = mask
        with torch.no_grad():
            target = self.config["target"]
            pre_logits = torch.zeros(1, int(target.get("pre_logits_width", 0)))
            out = self(feature, torch.zeros(1, int(target["num_classes"])), pre_logits, **context)
        if tuple(out.shape) != (1, len(self.class_ids)):
            raise PatchFormatError(f"patch produces {tuple(out.shape[1:])} scores for {len(self.class_ids)} classes")


def _check_metadata(config: dict) -> None:
    """The metadata that attach, check and summary read, with the types they expect (the file is untrusted)."""

    def ints(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)

    def strings(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    sections = {key: config.get(key) for key in ("source", "cut", "target", "insertion")}
    bad = [key for key, value in sections.items() if not isinstance(value, dict)]
    if bad:
        raise PatchFormatError(f"config sections {bad} must be JSON objects")
    source, cut, target, insertion = sections.values()
    shapes = target.get("parameter_shapes")
    checks = {
        "source.id": isinstance(source.get("id"), str),
        "cut.name": isinstance(cut.get("name"), str),
        "cut.shape": ints(cut.get("shape")),
        "insertion.name": isinstance(insertion.get("name"), str),
        "insertion.shape": ints(insertion.get("shape")),
        "target.id": isinstance(target.get("id"), str),
        "target.class": isinstance(target.get("class"), str),
        "target.insertion_type": isinstance(target.get("insertion_type"), str),
        "target.num_classes": ints([target.get("num_classes")]) and target["num_classes"] > 0,
        "target.feature_shape": ints(target.get("feature_shape")),
        "target.parameter_shapes": isinstance(shapes, dict) and all(isinstance(k, str) and ints(v) for k, v in shapes.items()),
        "target.classifiers": strings(target.get("classifiers", [])),
        "target.pre_logits_width": ints([target.get("pre_logits_width", 0)]),
    }
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        raise PatchFormatError(f"config fields {bad} are missing or of the wrong type")


def _assign(patch: Patch, tensors: dict[str, torch.Tensor]) -> None:
    """Put loaded tensors into the rebuilt modules (their shapes may be pruned: parameters are replaced, not copied into)."""
    expected = dict(patch.named_parameters(remove_duplicate=False))
    expected.update(patch.named_buffers(remove_duplicate=False))
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise PatchFormatError(f"tensors do not match the recorded architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, tensor in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = patch.get_submodule(owner_name)
        old = expected[name]
        if not name.startswith("branch.") and tuple(old.shape) != tuple(tensor.shape):  # only the branch is pruned
            raise PatchFormatError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(old.shape)}")
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            owner._buffers[attr] = tensor


def _as_point(model: nn.Module, point: Point | str, inputs: ModelInputs, find: Any) -> Point:
    if isinstance(point, Point):
        return point
    points = find(model, inputs)
    for candidate in points:
        if candidate.name == point:
            return candidate
    raise InvalidInputError(f"{point!r} is not a cut point of {type(model).__name__}; points: {[p.name for p in points]}")


def _class_names(names: list[str] | None, classes: Sequence[int]) -> list[str]:
    return [names[c] if names and c < len(names) else f"class_{c}" for c in classes]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
