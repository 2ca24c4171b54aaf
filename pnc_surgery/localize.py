"""Localization: prune the cloned branch to what the cloned classes need.

The branch is the source tail with only the cloned classes' head rows left, but its hidden units still
serve every source class. Localization removes the hidden units that the *local* task (telling the cloned
classes apart, measured on the clone data only) does not need, and makes the tensors physically smaller.

Prunable units come in *groups*: a producer (``Linear`` or ``Conv2d``) whose output channels pass only
through per-channel modules (norms, activations, dropout, depthwise convs) into one consumer (``Linear`` /
``Conv2d``): MLP hidden units of transformer blocks, the inner channels of residual bottlenecks; and the heads
of an attention module (its query, key and value projections, fused or not, into its output projection), a head
being ``head_dim`` channels at the output projection. Residual stream widths are never touched. Channel groups
are discovered from the execution order of the branch's leaf modules, head groups from the attention modules
the branch calls, and each one is *proved*: pruning it physically must give exactly what zeroing its channels at
the consumer gives. Units are ranked by first-order Taylor importance of the local loss (a head by the sum over
its channels). Every channel group keeps the same fraction of its units, then every head group the same fraction
of its heads, each fraction the smallest that keeps local accuracy within the tolerance. An optional parameter
budget then lowers both fractions together, down to the smallest tried, until the pruned branch fits it: the final
training (distillation from the source) wins back part of what the mask loses, more of it the more clone data
there is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from .branch import Branch
from .tracing import trace_model

__all__ = [
    "PruneGroup",
    "find_prune_groups",
    "unit_importance",
    "keep_indices",
    "MaskedUnits",
    "prune",
    "branch_parameters",
    "pruned_parameters",
    "local_accuracy",
    "localize",
]

BranchBatch = tuple[torch.Tensor, torch.Tensor, dict]
"""``(feature at the cut, label index among the cloned classes, context)``."""


@dataclass
class PruneGroup:
    """One set of prunable hidden units: producers -> per-channel modules -> consumer.

    Attributes:
        producers: the modules whose output channels are the units, each with its number of sections (a fused
            query-key-value projection has 3, the unit's channels sit at the same place in each section).
        passthrough: per-channel modules between producers and consumer that hold tensors.
        consumer: the module whose input channels are the units.
        size: channels at the consumer's input.
        unit: channels one unit spans (1; an attention head's width for a head group).
        heads_of: the attention module whose head count follows the pruning (head groups only).
    """

    producers: list[tuple[str, int]]
    passthrough: list[str]
    consumer: str
    size: int
    unit: int = 1
    heads_of: str | None = None

    @property
    def units(self) -> int:
        """Prunable units: channels, or heads."""
        return self.size // self.unit

    def channels(self, units: torch.Tensor) -> torch.Tensor:
        """The consumer input channels of ``units`` (sorted unit indices), in order."""
        return (units[:, None] * self.unit + torch.arange(self.unit)).flatten()


def branch_parameters(branch: Branch) -> int:
    """Parameters the branch holds (stub placeholders are empty)."""
    return sum(p.numel() for p in branch.parameters())


def pruned_parameters(branch: Branch, groups: Sequence[PruneGroup], kept: dict[str, torch.Tensor]) -> int:
    """Parameters ``branch`` would hold after :func:`prune` with ``kept``, counted without pruning it."""
    removed = 0
    for group in groups:
        if group.consumer not in kept:
            continue
        dropped = group.size - len(kept[group.consumer])  # channels
        for name, sections in group.producers:
            removed += dropped * sections * _per_channel(branch.model.get_submodule(name))
        for name in group.passthrough:
            removed += dropped * _per_channel(branch.model.get_submodule(name))
        consumer_weight = branch.model.get_submodule(group.consumer).get_parameter("weight")
        removed += dropped * consumer_weight[:, 0].numel()
    return branch_parameters(branch) - removed


def _per_channel(module: nn.Module) -> int:
    """Parameters one output channel of ``module`` holds (its row of every tensor: weight, bias, norm scale)."""
    return sum(p[0].numel() for p in module.parameters(recurse=False))


def _channel_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.out_channels
    return None


def _consumes(module: nn.Module, width: int) -> bool:
    if isinstance(module, nn.Linear):
        return module.in_features == width
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.in_channels == width


def _passes_through(module: nn.Module, width: int) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features == width
    if isinstance(module, nn.Conv2d):
        return module.groups == module.in_channels == module.out_channels == width
    return not any(True for _ in module.parameters(recurse=False)) and not any(True for _ in module.children())


def _leaf_order(branch: Branch, feature: torch.Tensor, context: dict) -> list[tuple[str, nn.Module, tuple]]:
    """Leaf modules of the branch's model in call order, with their output shapes."""
    inputs = {"feature": feature, **context}
    trace = trace_model(branch, inputs, keep=lambda name: True)
    prefix = "model."
    leaves = []
    for call in sorted(trace.calls.values(), key=lambda c: c.pre):
        if not call.name.startswith(prefix) or any(True for _ in call.module.children()) or call.output is None:
            continue
        name = call.name[len(prefix) :]
        if (
            name in branch.stubs
            or name == branch.cut
            or any(name.startswith(s + ".") for s in [*branch.stubs, branch.cut])
        ):
            continue
        leaves.append((name, call.module, tuple(call.output.shape)))
    return leaves


def find_prune_groups(branch: Branch, feature: torch.Tensor, context: dict | None = None) -> list[PruneGroup]:
    """Producer -> per-channel -> consumer chains of the branch, each proved exact by a physical-vs-mask test.

    Args:
        branch: the branch (classifier rows already selected).
        feature: a small batch of features at the cut (to trace and to prove groups on).
        context: keyword inputs of the branch (attention masks).
    """
    context = dict(context or {})
    leaves = _leaf_order(branch, feature, context)
    skip = set(branch.classifiers)
    groups = []
    for i, (name, module, shape) in enumerate(leaves):
        width = _channel_width(module)
        if width is None or name in skip or width < 4:
            continue
        passthrough: list[str] = []
        for next_name, next_module, next_shape in leaves[i + 1 :]:
            if _consumes(next_module, width) and next_name not in skip:
                groups.append(PruneGroup([(name, 1)], passthrough, next_name, width))
                break
            if next_shape != shape or not _passes_through(next_module, width):
                break
            if any(True for _ in next_module.parameters(recurse=False)):
                passthrough.append(next_name)
    called = {name for name, _, _ in leaves}
    groups += [g for g in _head_groups(branch) if g.consumer in called]
    return [g for g in groups if _proves_exact(branch, g, feature, context)]


def _head_groups(branch: Branch) -> list[PruneGroup]:
    """The heads of every attention module of the branch's model: timm's (fused ``qkv`` into ``proj``) and
    transformers' (``q_proj``, ``k_proj``, ``v_proj`` into ``o_proj``), each with at least two heads."""
    groups = []
    for name, module in branch.model.named_modules():
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim < 1:
            continue
        names = [n for n, _ in module.named_children()]
        if {"qkv", "proj"} <= set(names):
            producers, consumer = [(f"{name}.qkv", 3)], f"{name}.proj"
        elif {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(names):
            producers, consumer = [(f"{name}.{n}", 1) for n in ("q_proj", "k_proj", "v_proj")], f"{name}.o_proj"
        else:
            continue
        output = branch.model.get_submodule(consumer)
        inputs = [branch.model.get_submodule(n) for n, _ in producers]
        if not isinstance(output, nn.Linear) or output.in_features % head_dim or output.in_features // head_dim < 2:
            continue
        size = output.in_features
        if not all(isinstance(m, nn.Linear) and m.out_features == k * size for m, (_, k) in zip(inputs, producers)):
            continue
        groups.append(PruneGroup(producers, [], consumer, size, unit=head_dim, heads_of=name))
    return groups


def _twin(branch: Branch) -> Branch:
    """A copy of ``branch`` to prune that shares every tensor: slicing replaces a module's tensors instead of writing
    into them, so only the modules and the recorded shape attributes need copies, not a large source's weights."""
    return copy.deepcopy(branch, memo={id(t): t for t in (*branch.parameters(), *branch.buffers())})


def _proves_exact(branch: Branch, group: PruneGroup, feature: torch.Tensor, context: dict) -> bool:
    units = torch.arange(group.units)
    keep = group.channels(units[units % 4 != 1])
    with torch.no_grad(), MaskedUnits(branch, {group.consumer: keep}):
        expected = branch(feature, **context)
    twin = _twin(branch)
    try:
        _slice_group(twin, group, keep)
        with torch.no_grad():
            got = twin(feature, **context)
    except (RuntimeError, ValueError):
        return False
    return got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


class MaskedUnits:
    """Context manager: zero the consumer inputs of every unit not in ``keep`` (a mask, no weights changed)."""

    def __init__(self, branch: Branch, keep: dict[str, torch.Tensor]) -> None:
        self.branch, self.keep = branch, keep
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> MaskedUnits:
        for consumer, kept in self.keep.items():
            module = self.branch.model.get_submodule(consumer)
            assert isinstance(module, (nn.Conv2d, nn.Linear)), "prune groups end in a linear or conv consumer"
            axis = 1 if isinstance(module, nn.Conv2d) else -1
            width = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            mask = torch.zeros(width)
            mask[kept] = 1.0

            def hook(mod: nn.Module, args: tuple, mask: torch.Tensor = mask, axis: int = axis) -> tuple:
                x = args[0]
                shape = [1] * x.dim()
                shape[axis] = -1
                return (x * mask.to(x).view(shape), *args[1:])

            self.handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def unit_importance(
    branch: Branch,
    groups: Sequence[PruneGroup],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, dict]],
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance |sum(a * dL/da)| of each unit, on the local loss (cross-entropy over the
    cloned classes).

    Args:
        batches: ``(feature at the cut, label index among the cloned classes, context)``.
    """
    scores = {g.consumer: torch.zeros(g.size) for g in groups}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for group in groups:
        module = branch.model.get_submodule(group.consumer)

        def hook(mod: nn.Module, args: tuple, name: str = group.consumer) -> None:
            if args[0].requires_grad:
                args[0].retain_grad()
            captured[name] = args[0]

        handles.append(module.register_forward_pre_hook(hook))
    try:
        for feature, labels, context in batches:
            captured.clear()
            feature = feature.detach().requires_grad_(True)
            loss = F.cross_entropy(branch(feature, **context), labels)
            branch.zero_grad(set_to_none=True)
            loss.backward()
            for group in groups:
                act = captured[group.consumer]
                if act.grad is None:
                    continue
                module = branch.model.get_submodule(group.consumer)
                axis = 1 if isinstance(module, nn.Conv2d) else act.dim() - 1
                dims = [d for d in range(act.dim()) if d != axis]
                scores[group.consumer] += (act * act.grad).sum(dim=dims).abs().detach().float().cpu()
    finally:
        for handle in handles:
            handle.remove()
        branch.zero_grad(set_to_none=True)
    return scores


def keep_indices(
    groups: Sequence[PruneGroup], scores: dict[str, torch.Tensor], ratio: float
) -> dict[str, torch.Tensor]:
    """The consumer input channels of the most important ``ratio`` of each group's units (at least one unit), in
    their original order; ``scores`` are per channel, a unit's is the sum over its channels."""
    kept = {}
    for group in groups:
        count = max(1, round(ratio * group.units))
        top = torch.topk(scores[group.consumer].view(group.units, group.unit).sum(-1), count).indices
        kept[group.consumer] = group.channels(torch.sort(top).values)
    return kept


def _slice(module: nn.Module, attr: str, index: torch.Tensor, dim: int) -> None:
    tensor = getattr(module, attr, None)
    if tensor is None:
        return
    sliced = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, attr, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        module._buffers[attr] = sliced


def _slice_group(branch: Branch, group: PruneGroup, keep: torch.Tensor) -> None:
    """Physically remove the channels of ``group`` not in ``keep``; record the new shape attributes."""
    count = len(keep)
    for name, sections in group.producers:
        producer = branch.model.get_submodule(name)
        rows = torch.cat([section * group.size + keep for section in range(sections)])
        _slice(producer, "weight", rows, 0)
        _slice(producer, "bias", rows, 0)
        attr = "out_features" if isinstance(producer, nn.Linear) else "out_channels"
        branch.set_attribute(name, attr, sections * count)
    for name in group.passthrough:
        module = branch.model.get_submodule(name)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _slice(module, attr, keep, 0)
        if isinstance(module, nn.Conv2d):
            for attr in ("in_channels", "out_channels", "groups"):
                branch.set_attribute(name, attr, count)
        else:
            branch.set_attribute(name, "num_features", count)
    consumer = branch.model.get_submodule(group.consumer)
    _slice(consumer, "weight", keep, 1)
    branch.set_attribute(group.consumer, "in_features" if isinstance(consumer, nn.Linear) else "in_channels", count)
    if group.heads_of is not None:
        attention = branch.model.get_submodule(group.heads_of)
        for attr, value in (("num_heads", count // group.unit), ("attn_dim", count)):
            if hasattr(attention, attr):
                branch.set_attribute(group.heads_of, attr, value)


def prune(branch: Branch, groups: Sequence[PruneGroup], kept: dict[str, torch.Tensor]) -> None:
    """Apply :func:`keep_indices`' choice to ``branch`` in place."""
    for group in groups:
        _slice_group(branch, group, kept[group.consumer])


@torch.no_grad()
def local_accuracy(branch: Branch, data: Sequence[BranchBatch]) -> float:
    """Share of ``data`` whose argmax among the cloned classes is the label."""
    correct = sum(int((branch(f, **c).argmax(-1) == y).sum()) for f, y, c in data)
    return correct / max(sum(len(y) for _, y, _ in data), 1)


def _smallest_ratio(
    branch: Branch,
    data: Sequence[BranchBatch],
    groups: Sequence[PruneGroup],
    scores: dict[str, torch.Tensor],
    fixed: tuple[Sequence[PruneGroup], dict[str, torch.Tensor]],
    ratios: Sequence[float],
    floor: float,
    progress: bool,
) -> float:
    """The smallest of ``ratios`` at which pruning ``groups`` (and the ``fixed`` groups to their kept channels) keeps
    local accuracy at ``floor`` or above; 1.0 when none does or there are no groups.

    Each ratio is measured on a pruned twin, which computes what a mask would (every group is proved exact) in a
    fraction of the unpruned branch's time."""
    if not groups:
        return 1.0
    fixed_groups, fixed_kept = fixed
    for candidate in tqdm(sorted(ratios), desc="pnc: localize", disable=not progress, leave=False):
        twin, kept = _twin(branch), {**fixed_kept, **keep_indices(groups, scores, candidate)}
        prune(twin, [g for g in (*fixed_groups, *groups) if g.consumer in kept], kept)
        if local_accuracy(twin, data) >= floor:
            return candidate
    return 1.0


def _kept(
    groups: tuple[Sequence[PruneGroup], Sequence[PruneGroup]],
    scores: dict[str, torch.Tensor],
    ratios: tuple[float, float],
) -> dict[str, torch.Tensor]:
    """The kept channels of the channel groups at the first ratio and of the head groups at the second."""
    kept: dict[str, torch.Tensor] = {}
    for part, ratio in zip(groups, ratios):
        if ratio < 1.0:
            kept.update(keep_indices(part, scores, ratio))
    return kept


def _within_budget(
    branch: Branch,
    groups: tuple[Sequence[PruneGroup], Sequence[PruneGroup]],
    scores: dict[str, torch.Tensor],
    tolerated: tuple[float, float],
    ratios: Sequence[float],
    max_parameters: int,
) -> tuple[float, float]:
    """The ``tolerated`` (channel, head) keep ratios, each capped by the largest of ``ratios`` at which the pruned
    branch holds at most ``max_parameters`` (both capped alike; the smallest of ``ratios`` when none fits)."""
    every = [*groups[0], *groups[1]]
    caps = [1.0, *sorted((r for r in ratios if r < max(tolerated)), reverse=True)]
    for cap in caps:
        capped = (min(tolerated[0], cap) if groups[0] else 1.0, min(tolerated[1], cap) if groups[1] else 1.0)
        if pruned_parameters(branch, every, _kept(groups, scores, capped)) <= max_parameters:
            return capped
    return capped


def localize(
    branch: Branch,
    data: Sequence[BranchBatch],
    *,
    keep_ratio: float | None,
    keep_ratios: Sequence[float],
    tolerance: float,
    max_parameters: int | None = None,
    progress: bool = False,
) -> tuple[float, dict[str, Any]]:
    """Prune ``branch`` in place to what the local task on ``data`` needs.

    Args:
        branch: the branch (classifier rows already selected).
        data: the clone data's features at the cut, in batches.
        keep_ratio: the fraction of units (and of attention heads) to keep; ``None`` picks the smallest of
            ``keep_ratios`` whose local accuracy is within ``tolerance`` of the unpruned branch's, for hidden units
            first, then for heads with the hidden units so pruned.
        max_parameters: with ``keep_ratio`` ``None``, the most parameters the pruned branch may hold: both ratios are
            lowered together through ``keep_ratios`` until it fits (to the smallest when none does).
        progress: show a progress bar over the ratios tried.

    Returns:
        The keep ratio of hidden units and the stage's metrics (local accuracy before pruning, groups found, the
        heads' keep ratio, local accuracy after pruning).
    """
    unpruned = local_accuracy(branch, data)
    probe_feature, _, probe_context = data[0]
    groups = find_prune_groups(branch, probe_feature[:8], {k: v[:8] for k, v in probe_context.items()})
    channel_groups = [g for g in groups if g.heads_of is None]
    head_groups = [g for g in groups if g.heads_of is not None]
    metrics: dict[str, Any] = {
        "branch_local_accuracy": round(unpruned, 4),
        "prune_groups": len(channel_groups),
        "head_groups": len(head_groups),
    }
    if not groups:
        return 1.0, metrics
    for parameter in branch.parameters():
        parameter.requires_grad_(True)
    scores = unit_importance(branch, groups, data)
    for parameter in branch.parameters():
        parameter.requires_grad_(False)
    floor = unpruned - tolerance
    ratio = keep_ratio or _smallest_ratio(branch, data, channel_groups, scores, ([], {}), keep_ratios, floor, progress)
    kept = keep_indices(channel_groups, scores, ratio) if ratio < 1.0 else {}
    head_ratios = keep_ratios
    if keep_ratio is None and max_parameters is not None and head_groups:
        # the budget lowers the heads' ratio to at most this one in any case (see _within_budget): measuring those
        # above it would change nothing but the reported tolerated ratio (1.0 then)
        allowed = _within_budget(
            branch, (channel_groups, head_groups), scores, (ratio, 1.0), keep_ratios, max_parameters
        )[1]
        head_ratios = [r for r in keep_ratios if r <= allowed]
    head_ratio = keep_ratio or _smallest_ratio(
        branch, data, head_groups, scores, (channel_groups, kept), head_ratios, floor, progress
    )
    if keep_ratio is None and max_parameters is not None:
        metrics["tolerated_keep_ratios"] = [ratio, head_ratio]
        ratio, head_ratio = _within_budget(
            branch, (channel_groups, head_groups), scores, (ratio, head_ratio), keep_ratios, max_parameters
        )
    kept = _kept((channel_groups, head_groups), scores, (ratio, head_ratio))
    prune(branch, [g for g in groups if g.consumer in kept], kept)
    metrics["head_keep_ratio"] = head_ratio
    metrics["pruned_branch_local_accuracy"] = round(local_accuracy(branch, data), 4)
    return ratio, metrics
