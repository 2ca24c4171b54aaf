"""Trace a model: one forward with hooks on every module, recording what each module did and in which order.

The rest of the library reads a :class:`Trace` to find cut points, capture features, and find the classifier
modules whose inputs (pre-logits) carry what the logits of a random-init head hide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backends import Backend, ModelInputs, backend_for
from .backends.base import call_model

__all__ = ["ModuleCall", "Trace", "classifier_names", "eval_mode", "main_output", "trace_model", "with_main_output"]


@dataclass
class ModuleCall:
    """What one module did during a traced forward: ``pre`` / ``post`` order its first call's start and end among
    every module call, ``last_post`` its last call's end.

        ``output`` is the module's feature (kept only where asked): its tensor output, or the first element of a tuple
        output that leads with a tensor (``packed``; transformers layers returning ``(hidden, attention)``), whose other
        elements are kept in ``extras``.
    """

    name: str
    module: nn.Module
    pre: int
    post: int = -1
    last_post: int = -1
    calls: int = 0
    output: torch.Tensor | None = None
    output_id: int | None = None
    packed: bool = False
    extras: tuple = ()
    passed_on: tuple[int | str | None, ...] = ()
    """For each of ``extras``, the argument (position or keyword) the module returned unchanged, else ``None``
    (a T5 block passes on the position bias it was given)."""


@dataclass
class Trace:
    """The record of one forward: module calls in order, the output, and the classifier modules."""

    calls: dict[str, ModuleCall]
    output: Any
    logits: torch.Tensor
    classifiers: list[str] = field(default_factory=list)
    pre_logits: torch.Tensor | None = None

    def completed_before(self, name: str) -> Callable[[ModuleCall], bool]:
        """Whether a call record's every call ended before ``name``'s first call began."""
        start = self.calls[name].pre
        return lambda call: 0 <= call.last_post < start


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode (BatchNorm statistics move in train mode even under no_grad) and restore each module's mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


def main_output(output: Any) -> tuple[torch.Tensor | None, bool]:
    """A module output's feature and whether it came packed in a tuple: the tensor itself, the first element of
    a tuple or list that leads with a tensor, else ``None``."""
    if isinstance(output, torch.Tensor):
        return output, False
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], True
    return None, False


def with_main_output(output: Any, feature: torch.Tensor) -> Any:
    """``output`` with its feature (see :func:`main_output`) replaced by ``feature``, in the same container type."""
    if isinstance(output, torch.Tensor):
        return feature
    items = [feature, *output[1:]]
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return type(output)(*items)
    return type(output)(items)


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _argument_of(value: Any, args: tuple, kwargs: dict) -> int | str | None:
    """The position or keyword of the call argument that is ``value`` itself (a tensor passed on), else ``None``."""
    if not isinstance(value, torch.Tensor):
        return None
    named: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
    return next((key for key, arg in named if arg is value), None)


def trace_model(
    model: nn.Module,
    inputs: ModelInputs,
    backend: Backend | None = None,
    keep: Callable[[str], bool] = lambda name: False,
    classifiers: tuple[str, ...] | list[str] = (),
) -> Trace:
    """Run one forward with hooks on every module and record what each did.

    Args:
        model: the model (put it in eval mode first).
        inputs: what to call it with.
        backend: the model's backend (found if not given).
        keep: names of modules whose (cloned) tensor outputs to keep.
        classifiers: names of the classifier modules whose inputs to record as pre-logits.

    Returns:
        The :class:`Trace`.
    """
    backend = backend or backend_for(model)
    calls: dict[str, ModuleCall] = {}
    counter = iter(range(10**9))
    handles = []
    pre_logits: list[torch.Tensor] = []
    alive: list[torch.Tensor] = []  # the kept modules' own outputs: no freed tensor's id is reused during the forward

    def pre_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            call = calls.get(name)
            if call is None:
                calls[name] = ModuleCall(name, module, pre=next(counter))
            calls[name].calls += 1
            if name in classifiers and args and isinstance(args[0], torch.Tensor):
                pre_logits.append(args[0].detach().flatten(1).clone())

        return hook

    def post_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            call = calls[name]
            call.last_post = next(counter)
            if call.post < 0:
                call.post = call.last_post
                tensor, call.packed = main_output(output)
                call.output_id = id(tensor) if tensor is not None else None
                if tensor is not None and keep(name):
                    alive.append(tensor)
                    call.output = tensor.detach().clone()
                    if call.packed:
                        call.extras = tuple(_detached(item) for item in output[1:])
                        call.passed_on = tuple(_argument_of(item, args, kwargs) for item in output[1:])
            return None

        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name), with_kwargs=True))
        with torch.no_grad():
            output = call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    logits = backend.logits(output)
    return Trace(
        calls=calls,
        output=output,
        logits=logits.detach(),
        classifiers=list(classifiers),
        pre_logits=torch.cat(pre_logits, dim=1) if pre_logits else None,
    )


def classifier_names(trace: Trace, num_classes: int, after: int) -> list[str]:
    """Linear / 1x1-conv modules that produce class scores (several for distilled heads)."""
    names = []
    for call in trace.calls.values():
        module = call.module
        width = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
        if call.pre > after and width == num_classes and isinstance(module, (nn.Linear, nn.Conv2d)):
            names.append(call.name)
    return names
