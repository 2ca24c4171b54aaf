"""Attach and detach: the forward hooks that run a patch inside its target, and the checks made before they go in.

Five hooks do the work: a pre-hook on the target starts a call (recording its keyword inputs, such as attention
masks), a hook on the insertion module runs adapter and branch on the (detached) feature, pre-hooks on the
target's classifiers and of the branch record their inputs (the gate reads them), and an always-called hook on
the target appends the gated scores to the logits and ends the call, even when the forward raises.

Per-call state lives on a per-thread stack owned by the :class:`Attachment`, never on the patch, so several
threads may call one patched target at once and each gets what a sequential call gives. ``copy.deepcopy`` of an
attached model gives a copy with its own working attachment (and its own copy of the patch); pickling one
(``torch.save(model)``) raises :class:`PatchStateError` saying what to save instead. Hooks present when a model is
compiled with ``torch.compile`` are traced in; attach before compiling.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..backends import backend_for
from ..errors import InvalidInputError, PatchMismatchError, PatchStateError
from ..evidence import pooled_feature
from ..tracing import main_output
from .config import PatchConfig
from .labels import SAVED_ATTR

if TYPE_CHECKING:
    from .module import Patch

__all__ = ["WEIGHTS_SAMPLE_SIZE", "Attachment", "BranchCapture", "check_fits", "drop_dead_captures", "weights_sample"]

WEIGHTS_SAMPLE_SIZE = 64
WEIGHTS_TOLERANCE = 1e-2  # relative L2 distance: a dtype cast stays far below it, a retrained model far above


def weights_sample(model: nn.Module) -> tuple[float, ...] | None:
    """The model's parameters at :data:`WEIGHTS_SAMPLE_SIZE` fixed positions: a fingerprint of its weights.

    The positions are drawn with a fixed seed over all parameters in ``named_parameters()`` order, so the same
    weights in another dtype or on another device give (nearly) the same sample and retrained weights another one.

    Returns:
        The sampled values as floats (weights that accelerate offloaded are read where its hooks keep them), or
        ``None`` when the weights cannot be read (parameters on the meta device with nothing behind them).
    """
    readable = [_offloaded(model, name) if p.device.type == "meta" else p for name, p in model.named_parameters()]
    params = [p for p in readable if p is not None and p.device.type != "meta"]
    if not params or len(params) < len(readable):
        return None
    total = sum(p.numel() for p in params)
    positions = (
        torch.randint(0, total, (WEIGHTS_SAMPLE_SIZE,), generator=torch.Generator().manual_seed(0)).sort().values
    )
    values, start = [], 0
    for p in params:
        inside = positions[(positions >= start) & (positions < start + p.numel())] - start
        if len(inside):
            values.append(p.detach().reshape(-1)[inside.to(p.device)].float().cpu())
        start += p.numel()
    return tuple(float(v) for v in torch.cat(values))


def _offloaded(model: nn.Module, name: str) -> torch.Tensor | None:
    """The value of parameter ``name`` that accelerate offloaded: the ``weights_map`` of the hook (on its module or,
    for hooks that place submodules, on an ancestor) that loads it before each forward; ``None`` if none has it."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:cut])), "_hf_hook", None)
        key = ".".join(parts[cut:])
        for single in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
            weights = getattr(single, "weights_map", None)
            if weights is not None and key in weights:
                return weights[key]
    return None


def check_fits(config: PatchConfig, model: nn.Module, strict: bool = True) -> None:
    """Raise :class:`PatchMismatchError` if a patch of ``config`` does not fit ``model`` (nothing is changed).

    Args:
        config: the patch's config.
        model: the target.
        strict: refuse a model whose id, class or weights differ from the ones the patch was made for (with
            ``False``, a warning); shapes are always checked.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"attach needs a torch.nn.Module, got {type(model).__name__}")
    fingerprint, insertion = config.target, config.insertion.name
    try:
        module = model.get_submodule(insertion)
    except AttributeError:
        raise PatchMismatchError(
            f"{type(model).__name__} has no module {insertion!r}; this patch was made for {fingerprint.id} "
            f"({fingerprint.class_name})"
        ) from None
    modules = dict(model.named_modules())
    missing = [name for name in fingerprint.classifiers if name not in modules]
    if missing:
        raise PatchMismatchError(
            f"{type(model).__name__} has no classifier modules {missing}; the patch reads their inputs"
        )
    problems = []
    if type(module).__name__ != fingerprint.insertion_type:
        problems.append(
            f"module {insertion!r} is a {type(module).__name__}, the patch expects a {fingerprint.insertion_type}"
        )
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    for name, shape in fingerprint.parameter_shapes.items():
        if shapes.get(name) != tuple(shape):
            problems.append(
                f"module {insertion!r}: parameter {name!r} has shape {shapes.get(name)}, the patch expects "
                f"{tuple(shape)} (feature shape {tuple(fingerprint.feature_shape)})"
            )
            break
    backend = backend_for(model)
    num_classes = backend.num_classes(model)
    saved_labels = model.__dict__.get(SAVED_ATTR)
    if num_classes is not None and saved_labels is not None:  # other patches attached: the target's own count
        num_classes = len(saved_labels[0])
    if num_classes is not None and num_classes != fingerprint.num_classes:
        problems.append(f"model scores {num_classes} classes, the patch was made for {fingerprint.num_classes}")
    if problems:
        raise PatchMismatchError("patch does not fit this model: " + "; ".join(problems))
    others = []
    if type(model).__name__ != fingerprint.class_name:
        others.append(f"model class is {type(model).__name__}, the patch was made for {fingerprint.class_name}")
    identity = backend.identity(model)
    if identity != fingerprint.id:
        others.append(f"target id is {identity!r}, the patch was made for {fingerprint.id!r}")
    if fingerprint.weights_sample is not None:
        sample = weights_sample(model)
        if sample is not None and _distance(sample, fingerprint.weights_sample) > WEIGHTS_TOLERANCE:
            others.append(
                "the target's weights differ from those the patch was made for (retrained or another checkpoint)"
            )
    if others:
        message = "patch was made for another target: " + "; ".join(others)
        if strict:
            raise PatchMismatchError(message + " (attach with strict=False to use it anyway, shapes fit)")
        warnings.warn(message, stacklevel=4)


def _distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    if len(a) != len(b):
        return float("inf")
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((x - y).norm() / y.norm().clamp_min(1e-12))


class Attachment:
    """One patch hooked into one model. Made by ``Patch.attach``; :meth:`remove` takes every hook out.

    Args:
        patch: the patch.
        model: the target (never registered as a submodule of the patch: its state_dict stays its own).
    """

    def __init__(self, patch: Patch, model: nn.Module) -> None:
        self.patch, self.model = patch, model
        self.backend = backend_for(model)
        config = patch.config
        self.insertion = config.insertion.name
        self.feature_shape = tuple(config.target.feature_shape)
        self.num_classes = config.target.num_classes
        self.pre_logits_width = config.target.pre_logits_width
        self.classifiers = tuple(config.target.classifiers)
        self.signature = inspect.signature(model.forward) if patch.branch.context_keys else None
        self._local = threading.local()
        self.handles: list[Any] = []

    def install(self) -> None:
        """Register the hooks (all or none)."""
        model = self.model
        try:
            self.handles.append(model.register_forward_pre_hook(self.on_call, with_kwargs=True))
            self.handles.append(model.get_submodule(self.insertion).register_forward_hook(self.on_insertion))
            for name in self.classifiers:
                self.handles.append(model.get_submodule(name).register_forward_pre_hook(self.on_classifier))
            for name in self.patch.branch.classifiers:  # hooks on the patch's own branch: what the gate reads
                branch_classifier = self.patch.branch.model.get_submodule(name)
                self.handles.append(branch_classifier.register_forward_pre_hook(BranchCapture(self)))
            self.handles.append(model.register_forward_hook(self.on_output, always_call=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook; safe to call twice."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # ------------------------------------------------------------------ per-call state
    def _stack(self) -> list[dict]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def on_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.jit.is_tracing() and any(p.requires_grad for p in self.patch.parameters()):
            raise PatchStateError(
                "torch.jit.trace stores the patch's weights as constants and refuses ones that require grad: call "
                "patch.requires_grad_(False) before tracing (or export with torch.export, which needs nothing)"
            )
        context: dict[str, Any] = {}
        if self.signature is not None:
            bound = self.signature.bind_partial(*args, **kwargs).arguments
            context = {k: bound[k] for k in self.patch.branch.context_keys if bound.get(k) is not None}
            branch = self.patch.branch
            if branch.reads_input and context.get(branch.main_input_name) is None:
                raise PatchMismatchError(
                    f"the patch's branch reads the token ids ({branch.main_input_name!r}) besides its feature: call "
                    f"{type(model).__name__} with them (not with inputs_embeds)"
                )
        self._stack().append({"context": context, "pre_logits": []})

    def on_insertion(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = self._stack()
        if not stack or "branch_logits" in stack[-1]:
            return  # a call of the module outside the target's forward, or a second call of a shared module
        returned, output = type(output).__name__, main_output(output)[0]  # a tuple's leading tensor is the feature
        if output is None:
            raise PatchMismatchError(f"insertion module {self.insertion!r} returned {returned}, not a tensor")
        got = tuple(output.shape[1:])
        text = self.patch.adapter.insertion.grid is None and self.patch.adapter.insertion.layout == "NLC"
        if got != self.feature_shape and not (text and len(got) == 2 and got[1] == self.feature_shape[1]):
            raise PatchMismatchError(
                f"insertion module {self.insertion!r} produced features of shape {got}; "
                f"the patch expects {self.feature_shape}"
            )
        feature = self.patch.receive(output.detach())
        state = stack[-1]
        state["branch_parts"] = []  # filled by the branch classifiers' pre-hooks (BranchCapture), this thread only
        try:
            logits = self.patch.branch(self.patch.adapter(feature), **state["context"])
        finally:
            parts = state.pop("branch_parts")
        state["branch_logits"] = logits
        state["branch_features"] = torch.cat(parts, dim=1) if parts else logits.new_zeros(len(logits), 0)
        state["insertion_features"] = pooled_feature(
            self.patch.adapter.to_grid(feature)[0], state["context"].get("attention_mask")
        )

    def on_classifier(self, module: nn.Module, args: tuple) -> None:
        stack = self._stack()
        if stack and args and isinstance(args[0], torch.Tensor):
            stack[-1]["pre_logits"].append(args[0].detach().flatten(1))

    def on_output(self, model: nn.Module, args: tuple, output: Any) -> Any:
        stack = self._stack()
        state = stack.pop() if stack else {}
        if output is None:
            return None  # the forward raised; its state is gone with it
        if "branch_logits" not in state:
            raise PatchMismatchError(
                f"insertion module {self.insertion!r} was not called during the forward; "
                "the patch cannot add its classes"
            )
        logits = self.backend.logits(output)
        own = logits[..., : self.num_classes].detach()
        parts = state["pre_logits"]
        pre_logits = torch.cat(parts, dim=1) if parts else own.new_zeros(own.shape[0], 0)
        if pre_logits.shape[1] != self.pre_logits_width:
            raise PatchMismatchError(
                f"the target's classifier input has {pre_logits.shape[1]} features; "
                f"the patch expects {self.pre_logits_width}"
            )
        scores = self.patch.gate(
            self.patch.receive(own),
            state["branch_logits"],
            self.patch.receive(pre_logits),
            state["branch_features"],
            state["insertion_features"],
        )
        return self.backend.with_logits(output, torch.cat([logits, scores.to(logits.dtype)], dim=-1))

    # ------------------------------------------------------------------ copies
    def __deepcopy__(self, memo: dict) -> Attachment | None:
        """A copy of the attached model carries its own attachment; a copy of the patch alone comes out detached."""
        import copy

        if id(self.model) not in memo:
            return None
        new = Attachment.__new__(Attachment)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, threading.local() if key == "_local" else copy.deepcopy(value, memo))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise PatchStateError(
            "a model with a pnc_surgery patch attached cannot be pickled (torch.save(model)): save "
            "model.state_dict() (the patch never changes it) and the patch with patch.save_pretrained(...), or "
            "patch.detach() first"
        )


class BranchCapture:
    """Pre-hook on a classifier of the patch's branch: records its input into the calling thread's current call.

    An object rather than a bound method so that a copy of the patch alone (whose attachment comes out ``None``)
    holds a hook that does nothing, which :func:`drop_dead_captures` then removes.
    """

    def __init__(self, attachment: Attachment | None) -> None:
        self.attachment = attachment

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.attachment is None:
            return
        stack = self.attachment._stack()
        if stack and "branch_parts" in stack[-1] and args and isinstance(args[0], torch.Tensor):
            stack[-1]["branch_parts"].append(args[0].detach().flatten(1))

    def __deepcopy__(self, memo: dict) -> BranchCapture:
        import copy

        return BranchCapture(copy.deepcopy(self.attachment, memo))


def drop_dead_captures(module: nn.Module) -> None:
    """Remove the :class:`BranchCapture` hooks of no attachment from ``module``'s submodules (a copied patch)."""
    for submodule in module.modules():
        dead = [
            k for k, h in submodule._forward_pre_hooks.items() if isinstance(h, BranchCapture) and h.attachment is None
        ]
        for key in dead:
            del submodule._forward_pre_hooks[key]
