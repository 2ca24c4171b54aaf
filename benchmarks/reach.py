"""Reach: on how many architectures does ``find_points`` offer valid cut points, spread over the depth?

One model per timm family (the smallest variant of every model module ``timm.list_models()`` offers, by
parameter count) and every transformers class of the ``*ForImageClassification`` / ``*ForSequenceClassification``
auto mappings that can be built from a small config. Every model is built without weights, at a reduced input
size where it takes one (64 px tried first), with BatchNorm statistics set from a few random batches (as
trained models have them); text models get a padded batch (pad ids under the mask, an eos at each text's end).

For each model: the points ``find_points`` returns, each re-checked by an *independent* substitution test written
here (not the library's): near-zero weight tensors (zero-init norms, layer scales) are woken up in a copy, a
second input (other pixels, or other ordinary token ids at the attended positions) is run with the point's output
swapped for the first input's, and the logits and the classifier's input must come back as the first input's
(relative error <= ``VALID_RTOL`` of the two inputs' difference). A point is *invalid* if it fails. Depth is a
point's rank among the forward's module completions, over their number; the points are *spread* when no gap
between consecutive valid points, the input (depth 0) and the output (depth 1) included, is over ``MAX_GAP``.
A second depth, the share of the forward's FLOPs done when the point completes, is recorded beside it and the
table counts the rows by both.

``--exhaustive`` runs the same substitution test on every module called once (not only on the points offered), by
default on the rows that are not ``ok``, and says per model whether single-tensor cuts that would spread exist
that ``find_points`` did not offer (``--point-shaped`` tests only the maps and sequences a point could be).

Statuses: ``ok`` (>= 3 valid points, spread, none invalid), ``few`` (fewer or not spread), ``invalid`` (an
invalid point), ``refused`` (a ``PncError`` naming the reason), ``crashed`` (any other exception: a bug),
``timeout`` (over ``--timeout`` seconds, building included), ``unbuildable`` (no small config builds or runs:
not counted), ``check-error`` (the independent check itself failed: counted as a miss). Models run one after another
in a single-threaded child process; one over the timeout ends the child and the next starts a new one. Results are
appended to a JSON-lines file, so a run can be resumed or split into chunks (``--part i/n``).

Run:  python -m benchmarks.reach                       (everything; about an hour on one core)
      python -m benchmarks.reach --part 1/4 --timeout 120
      python -m benchmarks.reach --only timm:inception_v3,hf:GPT2ForSequenceClassification --fresh
      python -m benchmarks.reach --table                (rewrite the table from the results file)
      python -m benchmarks.reach --clone                (clone() end to end on one pair per family group)
      python -m benchmarks.reach --exhaustive --timeout 900   (every module of the misses: reach_exhaustive.md)
      python -m benchmarks.reach --depths               (FLOP depths for rows measured before they were recorded)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import queue
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).parent / "results"
NUM_CLASSES = 11
"""Every model gets this many classes, a number no default config uses (it finds the classifier layers)."""
VALID_RTOL = 1e-3
MAX_GAP = 0.5
IMAGE_SIZES = (64, 96, 128, 160, 56, 112, 224)
"""Input sizes tried in this order below the model's own; 56 and 112 (multiples of 14) serve patch-14 models that
run at none of the others, before 224."""
TEXT_LENGTH = 16
SMALL_TEXT = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 37,
    "n_embd": 32,
    "n_layer": 4,
    "n_head": 4,
    "d_model": 32,
    "d_ff": 37,
    "d_kv": 8,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "num_heads": 4,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 37,
    "decoder_ffn_dim": 37,
    "ffn_dim": 37,
    "head_dim": 8,
    "embedding_size": 32,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "pooler_hidden_size": 32,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "n_routed_experts": 4,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
}
"""Overrides that make a text config small (only keys the config already has are set)."""
SMALL_IMAGE = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "image_size": 64,
    "embed_dim": 32,
    "mlp_ratio": 2,
}
"""Overrides that make an image config small; list-valued depths become one block a stage."""


# -------------------------------------------------------------------------------------------- what to run
def timm_models(cache: Path) -> list[str]:
    """The smallest variant (by parameter count, built on the meta device) of each timm model module."""
    import timm
    from timm.models import _registry

    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("timm") == timm.__version__:
            return stored["models"]
    families: dict[str, tuple[int, str]] = {}
    for name in timm.list_models():
        family = _registry._model_to_module[name]
        try:
            with torch.device("meta"):
                count = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception:  # a variant that does not build is not a candidate
            continue
        if family not in families or count < families[family][0]:
            families[family] = (count, name)
    models = sorted(name for _, name in families.values())
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"timm": timm.__version__, "models": models}, indent=1))
    return models


def transformers_classes() -> list[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for mapping in (
        modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    ):
        for value in mapping.values():
            names.update([value] if isinstance(value, str) else value)
    return sorted(names)


# -------------------------------------------------------------------------------------------------- build
class Unbuildable(Exception):
    """No small config of this class builds and runs."""


def _calibrate(model: nn.Module, example: Any) -> nn.Module:
    """BatchNorm statistics from a few random batches, as a trained model has them; then eval mode.

    Scales drawn near zero at random (transformers' EfficientNet draws them from N(0, 0.02), so with eps 1e-3 every
    norm shrinks the signal until the output no longer depends on the input) are set to one. Scales that are all
    zero (zero-init residual branches) are left for ``find_points`` to handle."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if norms and isinstance(example, torch.Tensor):
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            weight = norm.weight
            if weight is not None and 0 < weight.detach().abs().max() < 0.1:
                nn.init.ones_(weight)
        model.train()
        with torch.no_grad():
            for seed in range(3):
                model(torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def _runs(model: nn.Module, example: Any) -> bool:
    global _LAST_ERROR
    try:
        with torch.no_grad():
            model.eval()(**example) if isinstance(example, dict) else model.eval()(example)
    except Exception as exc:  # any failure means "not at this size"
        _LAST_ERROR = f"{type(exc).__name__}: {str(exc)[:120]}"
        return False
    return True


_LAST_ERROR = ""
"""Why the last model that did not run failed (for the unbuildable rows' reasons)."""


def build_timm(name: str) -> tuple[nn.Module, torch.Tensor, str]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    channels, height, _ = model.pretrained_cfg.get("input_size", (3, 224, 224))
    fixed = max(height, 32)
    for size in [s for s in IMAGE_SIZES if s < fixed] + [fixed]:
        example = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
        if _runs(model, example):
            return _calibrate(model, example), example, f"{size}px"
        try:
            torch.manual_seed(0)
            resized = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=size)
        except Exception:  # the constructor takes no img_size, or not this one
            continue
        if _runs(resized, example):
            return _calibrate(resized, example), example, f"{size}px (img_size={size})"
    raise Unbuildable(f"runs at none of {IMAGE_SIZES} nor {fixed}px")


def _shrink(config: Any, overrides: dict[str, Any]) -> None:
    layers = getattr(config, "num_hidden_layers", None)
    for key, value in overrides.items():
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            try:
                setattr(config, key, value)
            except AttributeError:  # a derived property (Falcon's head_dim)
                continue
    if getattr(config, "vocab_size", 0) is None:
        config.vocab_size = 64
    if isinstance(layers, int) and layers > config.num_hidden_layers:
        for key, value in list(vars(config).items()):  # per-layer lists (layer_types, ...) follow the depth
            if isinstance(value, list) and len(value) == layers:
                setattr(config, key, value[: config.num_hidden_layers])
    for key in ("depths", "num_layers_per_stage", "block_repeats"):
        current = getattr(config, key, None)
        if isinstance(current, (list, tuple)) and all(isinstance(v, int) for v in current):
            setattr(config, key, [1] * len(current))


def _text_example(config: Any) -> dict[str, torch.Tensor]:
    from pnc_surgery.backends.base import ordinary_tokens

    vocab = int(getattr(config, "vocab_size", None) or 256)  # character models (CANINE) take code points
    special = {
        v
        for k in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")
        for v in ([getattr(config, k, None)] if not isinstance(getattr(config, k, None), list) else getattr(config, k))
        if isinstance(v, int) and 0 <= v < vocab
    }
    ids = ordinary_tokens(vocab, sorted(special), (2, TEXT_LENGTH), torch.Generator().manual_seed(0))
    mask = torch.ones(2, TEXT_LENGTH, dtype=torch.long)
    mask[1, -TEXT_LENGTH // 4 :] = 0
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if isinstance(eos, int) and 0 <= eos < vocab:
        ids[torch.arange(2), mask.sum(1) - 1] = eos
    ids[mask == 0] = config.pad_token_id
    return {"input_ids": ids, "attention_mask": mask}


def build_transformers(name: str) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise Unbuildable(f"transformers {transformers.__version__} does not export {name}")
    image = "ForImageClassification" in name
    errors = []
    for small in (True, False):
        try:
            config = cls.config_class()
            if small:
                _shrink(config, SMALL_IMAGE if image else SMALL_TEXT)
            config.num_labels = NUM_CLASSES
            if not image and getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = 0  # a padded batch needs one, as tokenizers set it
            if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
                config.decoder_start_token_id = config.pad_token_id  # as T5's checkpoints set it
            torch.manual_seed(0)
            with torch.device("meta"):
                count = sum(p.numel() for p in cls(config).parameters())
            if count > 150e6:
                raise Unbuildable(f"{count / 1e6:.0f}M parameters")
            model = cls(config)
            setting = "small config" if small else "default config"
            if image:
                size = getattr(config, "image_size", None)
                size = size if isinstance(size, int) or size is None else int(size[0])
                channels = int(getattr(config, "num_channels", 3))
                for side in dict.fromkeys([64, size or 224]):
                    pixels = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))
                    if side != 64:  # a model that failed at another size can keep state from it (DonutSwin)
                        torch.manual_seed(0)
                        model = cls(config)
                    if _runs(model, {"pixel_values": pixels}):
                        return _calibrate(model, pixels), {"pixel_values": pixels}, f"{setting}, {side}px"
            elif _runs(model, _text_example(config)):
                return model.eval(), _text_example(config), setting
            errors.append(f"does not run on its example ({_LAST_ERROR})")
        except Exception as exc:  # a config this class rejects
            errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
    raise Unbuildable("; ".join(errors))


# ---------------------------------------------------------------------------------- independent checking
def _awake(model: nn.Module, scale: float = 1.0) -> nn.Module:
    """A copy in which near-zero weight tensors are drawn again around ``scale``, so no residual branch is silent."""
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if param.dim() and param.numel() > 1 and "bias" not in name.rsplit(".", 1)[-1] and param.abs().max() < 1e-3:
                param.copy_((torch.rand(param.shape, generator=gen) + 0.5) * scale)
    return twin


AWAKE_SCALES = (1.0, 0.1, 0.01)
"""Woken weights are drawn around one, or smaller where the woken model's answers are not finite (HaloNet)."""


def _other_input(model: nn.Module, example: Any) -> Any:
    gen = torch.Generator().manual_seed(11)
    if isinstance(example, torch.Tensor):
        return torch.randn(example.shape, generator=gen)
    if "pixel_values" in example:
        return {**example, "pixel_values": torch.randn(example["pixel_values"].shape, generator=gen)}
    ids, mask, config = example["input_ids"], example["attention_mask"], model.config
    structural = [config.pad_token_id, getattr(config, "eos_token_id", None), getattr(config, "bos_token_id", None)]
    flat = [t for v in structural for t in (v if isinstance(v, list) else [v]) if isinstance(t, int)]
    kept = (mask == 0) | torch.isin(ids, torch.tensor(flat, dtype=ids.dtype))
    ordinary = ids[~kept]
    fresh = ordinary[torch.randperm(ordinary.numel(), generator=gen)]
    other = ids.clone()
    other[~kept] = torch.where(fresh == ids[~kept], fresh.roll(1), fresh)
    return {**example, "input_ids": other}


def _answer(model: nn.Module, inputs: Any, swap: tuple[str, torch.Tensor] | None = None) -> tuple[dict, list, dict]:
    """One forward: the flattened logits and classifier inputs (with the step each classifier was entered at), and
    each module's first output with the step it completed at. ``swap`` replaces one module's output (the first
    element of a tuple output that leads with a tensor, the rest kept as this input made it)."""
    outputs: dict[str, tuple[int, torch.Tensor | None]] = {}
    heads: list[tuple[int, torch.Tensor]] = []
    step = iter(range(10**9))
    handles = []
    for name, module in model.named_modules():

        def keep(m: nn.Module, args: Any, out: Any, name: str = name) -> Any:
            if name in outputs:
                return None
            packed = isinstance(out, (tuple, list)) and len(out) > 0 and isinstance(out[0], torch.Tensor)
            tensor = out[0] if packed else out if isinstance(out, torch.Tensor) else None
            outputs[name] = (next(step), tensor.detach().clone() if tensor is not None else None)
            if swap is None or name != swap[0]:
                return None
            if not packed:
                return swap[1]
            rest = list(out[1:])
            return type(out)(swap[1], *rest) if hasattr(out, "_fields") else type(out)([swap[1], *rest])

        handles.append(module.register_forward_hook(keep))
        if isinstance(module, (nn.Linear, nn.Conv2d)) and NUM_CLASSES in (
            getattr(module, "out_features", None),
            getattr(module, "out_channels", None),
        ):
            handles.append(
                module.register_forward_pre_hook(lambda m, args: heads.append((next(step), args[0].flatten(1).float())))
            )
    try:
        with torch.no_grad():
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    logits = out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]
    return logits.flatten(1).float(), heads, outputs


def _after(logits: torch.Tensor, heads: list, step: int) -> torch.Tensor:
    """The logits and the inputs of the classifiers entered after ``step`` (what a cut there must reproduce)."""
    return torch.cat([logits, *(h for at, h in heads if at > step)], dim=1)


def check_points(
    model: nn.Module,
    example: Any,
    names: list[str],
    crash_fails: bool = False,
    reading: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, dict[str, float]]:
    """Each point's independent substitution error and depth (rank of its module among completions, in [0, 1]).

    Args:
        model: the model.
        example: its first input.
        names: the modules to test.
        crash_fails: a forward that raises with a module's output swapped gives it an infinite error (a module
            whose output the rest reads for more than its values: a shape, a dtype) instead of raising.
        reading: points said to read the token ids besides their output (``Point.reads_input``), each with the
            modules a branch cut there computes from the ids (``Point.live``): tested by :func:`_reading_answer`.
    """
    other = _other_input(model, example)
    for scale in AWAKE_SCALES:
        twin = _awake(model, scale).eval()
        first_logits, first_heads, outputs = _answer(twin, example)
        second_logits, second_heads, _ = _answer(twin, other)
        if all(t.isfinite().all() for t in [first_logits, second_logits, *(h for _, h in first_heads + second_heads)]):
            break
    order = list(outputs)
    checked = {}
    reading = reading or {}
    for name in names:
        step, feature = outputs[name]
        try:
            if name in reading:
                swapped_logits, swapped_heads, _ = _reading_answer(twin, example, other, name, feature, reading[name])
            else:
                swapped_logits, swapped_heads, _ = _answer(twin, other, swap=(name, feature))
        except Exception:  # with crash_fails, a swap the forward cannot take fails the test
            if not crash_fails:
                raise
            checked[name] = {"error": float("inf"), "depth": order.index(name) / max(len(order) - 1, 1)}
            continue
        first = _after(first_logits, first_heads, step)
        spread = (_after(second_logits, second_heads, step) - first).abs().max().item()
        error = (
            (_after(swapped_logits, swapped_heads, step) - first).abs().max().item() / spread
            if spread > 0
            else float("inf")
        )
        checked[name] = {"error": error, "depth": order.index(name) / max(len(order) - 1, 1)}
    return checked


def _reading_answer(
    model: nn.Module, example: Any, other: Any, name: str, feature: torch.Tensor, live: tuple[str, ...] = ()
) -> tuple:
    """:func:`_answer` on ``example`` with ``name``'s output swapped for ``feature`` (its own) and every module call
    that ended before ``name``'s call began (nested ones too) returning what it returned on ``other``, except in the
    ``live`` modules (a branch computes them from the ids): a point that reads the input besides its output keeps the
    example's answer."""

    def record(inputs: Any) -> tuple[dict[str, list], dict[str, list]]:
        spans: dict[str, list] = {}
        outputs: dict[str, list] = {}
        step = iter(range(10**9))
        handles = []
        for module_name, module in model.named_modules():

            def begin(m: nn.Module, a: Any, n: str = module_name) -> None:
                spans.setdefault(n, []).append([next(step), None])

            def end(m: nn.Module, a: Any, out: Any, n: str = module_name) -> None:
                next(span for span in reversed(spans[n]) if span[1] is None)[1] = next(step)
                outputs.setdefault(n, []).append(out)

            handles += [module.register_forward_pre_hook(begin), module.register_forward_hook(end)]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return spans, outputs

    spans, _ = record(example)
    _, theirs = record(other)
    start = spans[name][0][0]
    handles = []
    for module_name, module in model.named_modules():
        ended = {k for k, (_, stop) in enumerate(spans.get(module_name, [])) if stop < start}
        if any(module_name == n or module_name.startswith(n + ".") or n.startswith(module_name + ".") for n in live):
            continue  # computed from the ids by the branch, or (a stack holding live modules) partly so
        if ended and module_name != name:
            calls = iter(range(10**9))

            def swap(m: nn.Module, a: Any, out: Any, n: str = module_name, ended: set = ended, calls=calls) -> Any:
                k = next(calls)
                return theirs[n][k] if k in ended else None

            handles.append(module.register_forward_hook(swap))
    try:
        return _answer(model, example, swap=(name, feature))
    finally:
        for handle in handles:
            handle.remove()


class _FlopCount(TorchDispatchMode):
    """Counts the FLOPs of the operations torch's flop counter knows (matmuls, convolutions, attention); unlike
    ``FlopCounterMode`` it tracks no modules, so parameters passed between modules (class tokens) do not trip it."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def flop_depths(model: nn.Module, example: Any) -> dict[str, float]:
    """Each module's depth as the share of the forward's FLOPs (matmuls, convolutions, attention) done when it
    first completes, in [0, 1]."""
    counter = _FlopCount()
    done: dict[str, int] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            done.setdefault(name, counter.total)

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules()]
    try:
        with torch.no_grad(), counter:
            model(**example) if isinstance(example, dict) else model(example)
    finally:
        for handle in handles:
            handle.remove()
    total = max(counter.total, 1)
    return {name: flops / total for name, flops in done.items()}


def _call_counts(model: nn.Module, example: Any) -> Counter:
    counts: Counter = Counter()
    handles = [
        m.register_forward_hook(lambda m, a, o, n=n: counts.update([n]) or None) for n, m in model.named_modules()
    ]
    try:
        with torch.no_grad():
            model(**example) if isinstance(example, dict) else model(example)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _point_shaped(output: tuple[int, torch.Tensor], batch: int, entered: int) -> bool:
    """Whether a module output (with the step it completed at) is a map or a sequence completed before the
    classifier was entered at step ``entered``."""
    step, out = output
    return out.dim() in (3, 4) and out.shape[0] == batch and step < entered


def exhaustive_check(model: nn.Module, example: Any, point_shaped: bool = False) -> dict[str, Any]:
    """The substitution test of :func:`check_points` on every module called once whose output is a tensor (or a
    tuple leading with one), not only on the points ``find_points`` offers.

    Args:
        model: the model.
        example: its example input.
        point_shaped: test only the modules a ``Point`` could express (see below; faster on large models).

    Returns:
        ``tested`` (how many modules), and for each that passes its output shape, its depth by rank and by FLOPs,
        and whether a ``Point`` can express it (a (B, C, H, W) / (B, H, W, C) map or a (B, L, C) sequence that
        completes before the classifier is entered).
    """
    counts = _call_counts(model, example)
    _, heads, outputs = _answer(model, example)
    batch = (next(iter(example.values())) if isinstance(example, dict) else example).shape[0]
    entered = min((at for at, _ in heads), default=len(outputs))
    names = [n for n, (_, out) in outputs.items() if n and counts[n] == 1 and out is not None]
    if point_shaped:
        names = [n for n in names if _point_shaped(outputs[n], batch, entered)]
    checked = check_points(model, example, names, crash_fails=True)
    flops = flop_depths(model, example)
    passed = {}
    for name in names:
        if checked[name]["error"] <= VALID_RTOL:
            out = outputs[name][1]
            passed[name] = {
                "shape": list(out.shape),
                "error": checked[name]["error"],
                "depth": round(checked[name]["depth"], 3),
                "flop_depth": round(flops[name], 3),
                "point": _point_shaped(outputs[name], batch, entered),
            }
    return {"tested": len(names), "passed": passed}


# ---------------------------------------------------------------------------------------------- one model
class _Verdicts(logging.Handler):
    """Collects ``find_points``' DEBUG reasons for the candidates it did not offer."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []
        self.logger = logging.getLogger("pnc_surgery.points")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "not a point: " in message:
            reason = message.split("not a point: ", 1)[1]
            self.reasons.append(re.sub(r"\([^)]*\d[^)]*\)|'[^']*'|\d+(\.\d+)?(e-?\d+)?", "_", reason))

    def __enter__(self) -> None:
        self.logger.addHandler(self)
        self.level_before, _ = self.logger.level, self.logger.setLevel(logging.DEBUG)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)

    def summary(self) -> str:
        return "; ".join(f"{count}x {reason}" for reason, count in Counter(self.reasons).most_common(2))


def _build(key: str, start: float) -> tuple[dict[str, Any], nn.Module | None, Any]:
    """The row's start and the model with its example, or an ``unbuildable`` row and no model."""
    torch.set_num_threads(1)
    family, name = key.split(":", 1)
    row: dict[str, Any] = {"key": key}
    try:
        model, example, setting = build_timm(name) if family == "timm" else build_transformers(name)
    except Exception as exc:  # Unbuildable, or a constructor that fails outright
        reason = str(exc) if isinstance(exc, Unbuildable) else f"{type(exc).__name__}: {str(exc)[:200]}"
        return (
            {**row, "status": "unbuildable", "reason": reason, "seconds": round(time.perf_counter() - start, 2)},
            None,
            None,
        )
    row["setting"] = setting
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    return row, model, example


def run_exhaustive(key: str, point_shaped: bool = False) -> dict[str, Any]:
    """One model's :func:`exhaustive_check` as a result row (status ``checked``)."""
    start = time.perf_counter()
    row, model, example = _build(key, start)
    if model is None:
        return row
    try:
        row.update(exhaustive_check(model, example, point_shaped), status="checked", point_shaped=point_shaped)
    except Exception as exc:  # the benchmark's own failure
        row.update(status="check-error", reason=f"{type(exc).__name__}: {str(exc)[:200]}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _on_meta(key: str, setting: str) -> tuple[nn.Module, Any]:
    """An image model built on the meta device at its row's ``setting`` (no weights, no compute: enough to count
    FLOPs), with a meta example."""
    family, name = key.split(":", 1)
    side = int(re.search(r"(\d+)px", setting).group(1))
    if family == "timm":
        import timm

        kwargs = {"img_size": side} if "img_size=" in setting else {}
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
        channels = model.pretrained_cfg.get("input_size", (3,))[0]
        return model.eval(), torch.empty(2, channels, side, side, device="meta")
    import transformers

    cls = getattr(transformers, name)
    config = cls.config_class()
    if setting.startswith("small"):
        _shrink(config, SMALL_IMAGE)
    config.num_labels = NUM_CLASSES
    with torch.device("meta"):
        model = cls(config)
    channels = int(getattr(config, "num_channels", 3))
    return model.eval(), {"pixel_values": torch.empty(2, channels, side, side, device="meta")}


def run_depths(key: str, row: dict[str, Any]) -> dict[str, Any]:
    """The FLOP depths of a row's points (measured before depths were), as a partial row. Image models are built on
    the meta device (FLOPs do not depend on the weights); text models, and image models that do not run there, are
    built as the row was."""
    start = time.perf_counter()
    flops = None
    if "px" in (row.get("setting") or ""):
        try:
            flops = flop_depths(*_on_meta(key, row["setting"]))
        except Exception:  # an operation without a meta kernel: build it for real
            flops = None
    if flops is None:
        built, model, example = _build(key, start)
        if model is None:
            return built
        flops = flop_depths(model, example)
    return {"key": key, "flop_depths": [round(flops[n], 3) for n in row["names"]]}


def run_one(key: str) -> dict[str, Any]:
    from pnc_surgery import find_points
    from pnc_surgery.errors import PncError

    start = time.perf_counter()
    row, model, example = _build(key, start)
    if model is None:
        return row
    found = time.perf_counter()
    verdicts = _Verdicts()
    try:
        with verdicts:
            points = find_points(model, example)
    except PncError as exc:
        return {
            **row,
            "status": "refused",
            "reason": f"{type(exc).__name__}: {exc}",
            "seconds": round(time.perf_counter() - start, 2),
        }
    except Exception as exc:  # reported as a crash, the library's bug
        return {
            **row,
            "status": "crashed",
            "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
            "seconds": round(time.perf_counter() - start, 2),
        }
    row["find_points_seconds"] = round(time.perf_counter() - found, 2)
    try:
        reading = {p.name: p.live for p in points if p.reads_input}
        checked = check_points(model, example, [p.name for p in points], reading=reading)
        flops = flop_depths(model, example)
    except Exception as exc:  # the benchmark's own failure, counted as a miss
        return {
            **row,
            "status": "check-error",
            "points": len(points),
            "reason": f"{type(exc).__name__}: {str(exc)[:200]}",
            "seconds": round(time.perf_counter() - start, 2),
        }
    valid = [n for n, c in checked.items() if c["error"] <= VALID_RTOL]
    invalid = {n: round(c["error"], 4) for n, c in checked.items() if n not in valid}
    row.update(
        points=len(points),
        valid=len(valid),
        invalid=invalid,
        depths=[round(checked[p.name]["depth"], 3) for p in points],
        flop_depths=[round(flops[p.name], 3) for p in points],
        names=[p.name for p in points],
        reading=sorted(reading),
        live={name: list(live) for name, live in reading.items() if live},
        reasons=verdicts.summary(),
    )
    row["status"] = status(row)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


# ---------------------------------------------------------------------------------------- clone end to end
def _timm_pair(source: tuple[str, dict], target: tuple[str, dict]) -> tuple[nn.Module, nn.Module]:
    from pnc_surgery.backends.timm import create_model

    torch.manual_seed(0)
    return tuple(create_model(name, num_classes=5, **kwargs).eval() for name, kwargs in (source, target))


def _hf_text_pair(decoder: bool) -> tuple[nn.Module, nn.Module]:
    import transformers as hf

    torch.manual_seed(0)
    if decoder:
        config = {
            "vocab_size": 64,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "n_positions": 32,
            "num_labels": 5,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
        }
        return hf.GPT2ForSequenceClassification(hf.GPT2Config(**config)).eval(), hf.GPT2ForSequenceClassification(
            hf.GPT2Config(**{**config, "n_layer": 3})
        ).eval()
    source = hf.BertForSequenceClassification(
        hf.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=5,
        )
    )
    target = hf.DistilBertForSequenceClassification(
        hf.DistilBertConfig(
            vocab_size=64,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=32,
            num_labels=5,
        )
    )
    return source.eval(), target.eval()


def _bart_pair(decoder_layers: int = 1) -> tuple[nn.Module, nn.Module]:
    """BART into DistilBERT: the source's decoder reads the ids, so a cut in its encoder is a point that reads them
    (and one in its decoder, before the last layer, also needs the encoder, computed from the ids)."""
    import transformers as hf

    torch.manual_seed(0)
    source = hf.BartForSequenceClassification(
        hf.BartConfig(
            vocab_size=64,
            d_model=32,
            encoder_layers=2,
            decoder_layers=decoder_layers,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=32,
            num_labels=5,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            decoder_start_token_id=1,
        )
    )
    return source.eval(), _hf_text_pair(decoder=False)[1]


def _t5_pair() -> tuple[nn.Module, nn.Module]:
    """T5 into DistilBERT: T5's blocks pass on the position bias their first block made, and its decoder reads the
    encoder's output."""
    import transformers as hf

    torch.manual_seed(0)
    config = hf.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        num_labels=5,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return hf.T5ForSequenceClassification(config).eval(), _hf_text_pair(decoder=False)[1]


_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
CLONE_PAIRS = {
    "CNN": lambda: _timm_pair(
        ("resnet18", {"channels": (8, 16, 32, 64), "stem_width": 8}), ("mobilenetv3_small_050", {})
    ),
    "ViT": lambda: _timm_pair(("vit_tiny_patch16_224", _VIT), ("deit_tiny_patch16_224", _VIT)),
    "hybrid": lambda: _timm_pair(("test_coatnet", {"img_size": 32}), ("resnet18", {"channels": (8, 16, 32, 64)})),
    "MLP": lambda: _timm_pair(("mixer_s16_224", {"img_size": 32}), ("resmlp_12_224", {"img_size": 32})),
    "Swin-like": lambda: _timm_pair(
        (
            "swin_tiny_patch4_window7_224",
            {
                "img_size": 32,
                "patch_size": 2,
                "window_size": 4,
                "embed_dim": 16,
                "depths": (1, 1, 2, 1),
                "num_heads": (1, 2, 2, 4),
            },
        ),
        ("vit_tiny_patch16_224", _VIT),
    ),
    "text encoder": lambda: _hf_text_pair(decoder=False),
    "text decoder": lambda: _hf_text_pair(decoder=True),
    "text encoder-decoder": _bart_pair,
    "text encoder-decoder, decoder cut": lambda: _bart_pair(decoder_layers=2),
    "text T5, decoder cut": _t5_pair,
}
"""One (source, target) pair per family group, small and random-init: the run checks mechanics, not accuracy."""
FORCED_CUTS = {
    "text encoder-decoder": "model.encoder.layers.1",
    "text encoder-decoder, decoder cut": "model.decoder.layers.0",
    "text T5, decoder cut": "transformer.decoder.block.1",
}
"""Groups whose point of interest the search might pass over: a cut in BART's encoder reads the ids; one in a
decoder before its last layer also computes the encoder from them."""


def _clone_data(text: bool, count: int, seed: int) -> tuple[Any, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    if not text:
        return torch.randn(count, 3, 32, 32, generator=gen) + labels[:, None, None, None].float(), labels
    ids = torch.randint(10, 64, (count, 12), generator=gen)
    mask = torch.ones_like(ids)
    ids[:, 0] = 2 + labels  # a marker token per class
    mask[1::2, 8:] = 0
    ids[1::2, 8:] = 0
    ids[torch.arange(count), mask.sum(1) - 1] = 1  # an eos ends each text, as a tokenizer writes it
    return {"input_ids": ids, "attention_mask": mask}, labels


def run_clone(group: str, directory: Path) -> dict[str, Any]:
    """Clone three classes for one pair with small budgets; check width, exact detach and save/load."""
    from pnc_surgery import CloneConfig, Patch, clone
    from pnc_surgery.demo import parameter_digest

    torch.set_num_threads(1)
    start = time.perf_counter()
    source, target = CLONE_PAIRS[group]()
    text = group.startswith("text")
    inputs, labels = _clone_data(text, 48, seed=0)
    probe, _ = _clone_data(text, 8, seed=1)
    rows = [({k: v[i] for k, v in inputs.items()} if text else inputs[i], int(labels[i])) for i in range(len(labels))]
    config = CloneConfig(
        max_cuts=2,
        max_insertions=2,
        search_steps=5,
        train_steps=10,
        keep_ratio=0.5,
        batch_size=16,
        cut=FORCED_CUTS.get(group),
    )

    def logits(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = model(**probe) if text else model(probe)
        return out if isinstance(out, torch.Tensor) else out.logits

    before, digest = logits(target), parameter_digest(target)
    try:
        patch = clone(source, target, rows, config=config, seed=0, progress=False)
        with patch.attached(target):
            patched = logits(target)
        patch.save_pretrained(directory / group.replace(" ", "_"))
        loaded = Patch.from_pretrained(directory / group.replace(" ", "_"))
        with loaded.attached(target):
            reloaded = logits(target)
    except Exception as exc:  # reported in the table with its reason
        return {
            "group": group,
            "status": "failed",
            "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
            "seconds": round(time.perf_counter() - start, 1),
        }
    checks = {
        "width": tuple(patched.shape) == (len(before), before.shape[1] + 3),
        "exact_detach": torch.equal(logits(target), before) and parameter_digest(target) == digest,
        "own_logits_kept": torch.equal(patched[:, : before.shape[1]], before),
        "save_load_equal": torch.allclose(reloaded, patched, atol=1e-5),
    }
    return {
        "group": group,
        "status": "ok" if all(checks.values()) else "failed",
        **checks,
        "cut": patch.metrics.get("cut"),
        "insertion": patch.metrics.get("insertion"),
        "reads_input": patch.branch.reads_input,
        "seconds": round(time.perf_counter() - start, 1),
    }


def clone_table(rows: list[dict]) -> str:
    lines = [
        "| group | status | cut -> insertion | reads ids | width | exact detach | save/load | seconds | reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['status']} | {r.get('cut', '')} -> {r.get('insertion', '')} | "
            f"{r.get('reads_input', '')} | {r.get('width', '')} | "
            f"{r.get('exact_detach', '')} | {r.get('save_load_equal', '')} | {r['seconds']} | "
            f"{r.get('reason', '')[:160]} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ driver
def _load(path: Path) -> dict[str, dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["key"]] = row
    return rows


def _gap(depths: list[float]) -> float:
    """The largest gap between consecutive depths, depth 0 and 1 included."""
    ordered = sorted(depths)
    return max(b - a for a, b in zip([0.0, *ordered], [*ordered, 1.0]))


def largest_gap(row: dict, measure: str = "depths") -> float:
    """The largest depth gap between consecutive valid points of a checked row, depth 0 and 1 included.

    Args:
        row: a checked row.
        measure: ``"depths"`` (rank among module completions) or ``"flop_depths"`` (share of the FLOPs).
    """
    return _gap([d for n, d in zip(row["names"], row[measure]) if n not in row["invalid"]])


def exhaustive_table(checked: dict[str, dict], rows: dict[str, dict]) -> str:
    """The exhaustive check's verdict per model, against the points ``find_points`` offered (``rows``)."""
    lines = [
        "# Exhaustive substitution check: every module called once, not only the points offered",
        "",
        "A module *passes* when swapping its output alone (the benchmark's own test) gives the first input's answer;",
        "it is *expressible* as a point when it is a (B, C, H, W) / (B, H, W, C) map or a (B, L, C) sequence",
        "completed before the classifier; *exact* counts the expressible passes whose swapped answer is bit for bit",
        "the first input's (where the run recorded errors). The last three columns use the exact expressible passes",
        "where errors were recorded, else all expressible passes; gaps are the largest depth gap among them.",
        "",
        "| model | tested | pass | expressible | exact | offered | expressible, not offered | gap (rank) "
        "| gap (FLOPs) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(checked):
        row = checked[key]
        if row.get("status") != "checked":
            lines.append(f"| {key} |  |  |  |  |  |  |  | {row.get('status')}: {row.get('reason', '')[:120]} |")
            continue
        passes = row["passed"]
        points = {n: p for n, p in passes.items() if p["point"]}
        offered = set(rows.get(key, {}).get("names") or [])
        cuts = {n: p for n, p in points.items() if p.get("error", 0) == 0}  # exact ones, where errors were recorded
        missed = sorted(set(cuts) - offered, key=lambda n: cuts[n]["depth"])
        gaps, verdicts = [], []
        for measure, label in (("depth", "rank"), ("flop_depth", "FLOPs")):
            every = [p[measure] for p in cuts.values()]
            some = [p[measure] for n, p in cuts.items() if n in offered]
            gaps.append(f"{_gap(every):.2f}")
            spread = [len(d) >= 3 and _gap(d) <= MAX_GAP for d in (every, some)]
            verdicts.append(
                f"{label}: "
                + ("no 3 spread cuts exist" if not spread[0] else "offered enough" if spread[1] else "MISSED cuts")
            )
        tested = f"{row['tested']} (maps, sequences)" if row.get("point_shaped") else row["tested"]
        exact = (
            sum(p.get("error", 1) == 0 for p in points.values()) if all("error" in p for p in passes.values()) else ""
        )
        shown = ", ".join(missed[:3]) + (f" (+{len(missed) - 3})" if len(missed) > 3 else "")
        lines.append(
            f"| {key} | {tested} | {len(passes)} | {len(points)} | {exact} | {len(offered)} | {shown} | {gaps[0]} | "
            f"{gaps[1]} | {'; '.join(verdicts)} |"
        )
    return "\n".join(lines) + "\n"


def status(row: dict, measure: str = "depths") -> str:
    """``invalid``, ``ok`` or ``few`` for a row whose points were checked (spread by ``measure``, see
    :func:`largest_gap`); its recorded status otherwise."""
    if "depths" not in row:
        return row["status"]
    if row["invalid"]:
        return "invalid"
    return "ok" if row["valid"] >= 3 and largest_gap(row, measure) <= MAX_GAP else "few"


def _counts(rows: dict[str, dict], measure: str) -> str:
    counts = Counter(status(r, measure) for r in rows.values())
    counted = len(rows) - counts["unbuildable"]
    return f"ok {counts['ok']}/{counted} ({100 * counts['ok'] / max(counted, 1):.1f}%); " + ", ".join(
        f"{k} {v}" for k, v in sorted(counts.items()) if k != "ok"
    )


def table(rows: dict[str, dict]) -> str:
    """The markdown reach table: counts by both depth measures, then one line a model."""
    with_flops = {k: r for k, r in rows.items() if "depths" not in r or "flop_depths" in r}
    rows = {key: {**row, "status": status(row)} for key, row in rows.items()}
    counted = [r for r in rows.values() if r["status"] != "unbuildable"]
    lines = [
        f"# Reach of find_points ({len(counted)} models counted, "
        f"{len(rows) - len(counted)} not buildable from a small config)",
        "",
        f"spread by rank among module completions: {_counts(rows, 'depths')}",
        f"spread by share of the FLOPs ({len(with_flops)} rows with FLOP depths): {_counts(with_flops, 'flop_depths')}",
        f"invalid points: {sum(len(r.get('invalid') or {}) for r in rows.values())}",
        "",
        "| model | setting | status (rank) | points | valid | largest gap (rank) | largest gap (FLOPs) | seconds "
        "| reason / invalid |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(rows):
        r = rows[key]
        note = r.get("reason") or (json.dumps(r["invalid"]) if r.get("invalid") else "")
        if r["status"] == "few":
            note = r.get("reasons") or r.get("reason", "")
        gaps = [f"{largest_gap(r, m):.2f}" if m in r else "" for m in ("depths", "flop_depths")]
        lines.append(
            f"| {key} | {r.get('setting', '')} | {r['status']} | {r.get('points', '')} | {r.get('valid', '')} | "
            f"{gaps[0]} | {gaps[1]} | {r.get('seconds', '')} | {note.replace('|', '/')[:200]} |"
        )
    return "\n".join(lines) + "\n"


def _load_points(out: Path) -> dict[str, dict]:
    """The points rows of ``out``, with the FLOP depths that ``--depths`` measured later for older rows."""
    rows = _load(out)
    for key, extra in _load(out.with_name(out.stem + "_depths.jsonl")).items():
        row = rows.get(key)
        if "flop_depths" in extra and row is not None and "flop_depths" not in row and "names" in row:
            row["flop_depths"] = extra["flop_depths"]
    return rows


def _run_children(keys: list[str], timeout: float, mode: str = "points") -> Iterator[dict]:
    """Run ``keys`` in one child process, yielding each result row; a model over ``timeout`` seconds (or one that
    kills the child) gets a timeout (crash) row and the child is ended, so the caller starts a new one."""
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.reach", "--children", ",".join(keys), "--mode", mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout] + [lines.put(None)], daemon=True).start()
    for key in list(keys):  # the child runs them in this order; the caller removes finished keys from ``keys``
        start = time.perf_counter()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            child.kill()
            child.wait(timeout=60)
            yield {
                "key": key,
                "status": "timeout",
                "reason": f"over {timeout:.0f} s",
                "seconds": round(time.perf_counter() - start, 1),
            }
            return
        if line is None:
            child.wait(timeout=60)
            yield {
                "key": key,
                "status": "crashed",
                "reason": f"the process died (exit {child.returncode})",
                "seconds": round(time.perf_counter() - start, 1),
            }
            return
        row = json.loads(line)
        assert row["key"] == key, f"the child answered {row['key']} for {key}"
        yield row
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:  # every row is in; a slow interpreter exit is not worth waiting for
        child.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--children", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="points", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated keys (timm:<name>, hf:<Class>) instead of all")
    parser.add_argument("--family", choices=("timm", "hf", "all"), default="all")
    parser.add_argument("--part", default="1/1", help="run the i-th of n interleaved chunks, e.g. 2/4")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per model, building included")
    parser.add_argument("--out", type=Path, default=RESULTS / "reach.jsonl")
    parser.add_argument("--fresh", action="store_true", help="rerun models already in the results file")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the results file")
    parser.add_argument("--clone", action="store_true", help="clone() end to end on one pair per family group instead")
    parser.add_argument(
        "--exhaustive",
        action="store_true",
        help="test every module called once, not only the points offered (to reach_exhaustive.jsonl)",
    )
    parser.add_argument(
        "--point-shaped",
        action="store_true",
        help="with --exhaustive: test only the modules a point could express (maps and sequences before the head)",
    )
    parser.add_argument(
        "--depths", action="store_true", help="add FLOP depths to the rows measured before they were recorded"
    )
    args = parser.parse_args(argv)
    if args.clone:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            results = []
            for group in CLONE_PAIRS:
                results.append(run_clone(group, Path(directory)))
                print(json.dumps(results[-1]), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "reach_clone.md").write_text(clone_table(results))
        print(clone_table(results))
        return
    if args.children:
        for key in args.children.split(","):
            if args.mode == "depths":
                row = run_depths(key, _load(args.out)[key])
            else:
                row = run_exhaustive(key, args.mode == "shaped") if args.mode != "points" else run_one(key)
            print(json.dumps(row), flush=True)
        return
    rows = _load_points(args.out)
    if args.depths:
        depths_file = args.out.with_name(args.out.stem + "_depths.jsonl")
        keys = [k for k in _selected(args) if "names" in rows.get(k, {}) and "flop_depths" not in rows[k]]
        _run_keys(keys, depths_file, args.timeout, "depths", args.fresh)
    elif args.exhaustive:
        exhaustive_file = args.out.with_name(args.out.stem + "_exhaustive.jsonl")
        keys = (
            args.only.split(",")
            if args.only
            else [k for k, r in rows.items() if status(r) not in ("ok", "unbuildable")]
        )
        mode = "shaped" if args.point_shaped else "exhaustive"
        checked = _run_keys(keys, exhaustive_file, args.timeout, mode, args.fresh)
        exhaustive_file.with_suffix(".md").write_text(exhaustive_table(checked, rows))
        print(exhaustive_table(checked, rows))
        return
    elif not args.table:
        _run_keys(_selected(args), args.out, args.timeout, "points", args.fresh)
    text = table(_load_points(args.out))
    (args.out.with_suffix(".md")).write_text(text)
    print(text.split("\n\n")[1])


def _selected(args: argparse.Namespace) -> list[str]:
    """The keys a run covers: ``--only``, else ``--family``'s, in ``--part``'s chunk."""
    if args.only:
        return args.only.split(",")
    keys = []
    if args.family in ("timm", "all"):
        keys += [f"timm:{n}" for n in timm_models(RESULTS / "reach_timm_models.json")]
    if args.family in ("hf", "all"):
        keys += [f"hf:{n}" for n in transformers_classes()]
    index, count = (int(v) for v in args.part.split("/"))
    return keys[index - 1 :: count]


def _run_keys(keys: list[str], out: Path, timeout: float, mode: str, fresh: bool) -> dict[str, dict]:
    """Run the keys not yet in ``out`` (all with ``fresh``) in children, appending each row; all of ``out``'s rows."""
    rows = _load(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pending = [key for key in keys if fresh or key not in rows]
    while pending:
        for row in _run_children(pending, timeout, mode):
            pending.remove(row["key"])
            rows[row["key"]] = row
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(
                f"{row['key']}: {row.get('status', mode)} {row.get('valid', '')}/{row.get('points', '')} "
                f"{row.get('seconds', '')}s {(row.get('reason') or '')[:100]}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
