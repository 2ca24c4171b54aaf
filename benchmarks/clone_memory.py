"""Peak memory of ``clone()`` against image size and clone-set size: ``python -m benchmarks.clone_memory``.

Every cell runs ``clone()`` in its own subprocess (one torch thread, an address-space cap and a timeout) and reads the
child's peak resident set (``resource.getrusage``). The bar of issue #17: the peak less the child's resident set just
before ``clone()`` (models and data already built) stays within ``memory_gb`` plus twice the two models' parameters
and the activations of one batch (every module's output for ``feature_batch_size`` inputs, float32).

Pairs: a CNN pair at timm's default widths (``resnet18`` into ``resnet18``) and a ViT pair (``vit_tiny_patch16_224``
into ``vit_tiny_patch16_224``, at the image size), untrained (memory does not depend on the weights), random images.
``--real-weights`` runs instead the shape of issue #17: EfficientNet-Lite1 into Lite0 with their ImageNet weights,
Fashion-MNIST at 64 px, 900 clone and 100 replay images, the default ``CloneConfig`` (or ``--config`` overrides, e.g.
the pair that crashed: a 32x32 cut against the target's pooled 1280 channels); ``--code DIR`` runs the child on another
checkout's ``pnc_surgery`` (``DIR/pnc_surgery``) to measure the code before a change::

    python -m benchmarks.clone_memory --out results/clone_memory
    python -m benchmarks.clone_memory --real-weights --config '{"cut": "blocks.0", "insertion": "global_pool.pool"}'
    python -m benchmarks.clone_memory --real-weights --code /tmp/old_checkout
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PAIRS", "activation_bytes", "main", "measure"]

PAIRS = {"cnn": ("resnet18", "resnet18"), "vit": ("vit_tiny_patch16_224", "vit_tiny_patch16_224")}
"""Grid pairs: (source, target) timm names."""

GRID_CONFIG = {"budget": "fast", "search_steps": 4, "train_steps": 8, "keep_ratio": 0.5}
"""CloneConfig of the grid's cells besides ``memory_gb``: every stage runs, briefly."""

REPLAY = 100
"""Replay images of every cell."""


def activation_bytes(model: Any, inputs: Any) -> int:
    """Bytes of every leaf module's float32 output for ``inputs`` (what one batch's backward would keep)."""
    import torch

    total = 0

    def count(module: Any, args: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += 4 * output.numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def _rss() -> int:
    """This process's resident set now, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def _synthetic(cell: dict[str, Any]) -> dict[str, Any]:
    """Untrained models of the cell's pair and random clone (3 source classes) and replay images."""
    import torch
    from torch.utils.data import TensorDataset

    from pnc_surgery.backends.timm import create_model

    size, examples = cell["image_size"], cell["examples"]
    kwargs = {"img_size": size} if cell["pair"] == "vit" else {}
    source_name, target_name = PAIRS[cell["pair"]]
    source = create_model(source_name, num_classes=10, **kwargs).eval()
    target = create_model(target_name, num_classes=5, **kwargs).eval()
    for model in (source, target):
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size)}
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(examples, 3, size, size, generator=generator), torch.arange(examples) % 3)
    replay = TensorDataset(torch.randn(REPLAY, 3, size, size, generator=generator))
    config = {**GRID_CONFIG, "memory_gb": cell["memory_gb"]}
    return {"source": source, "target": target, "data": data, "replay": replay, "config": config}


def _real_weights(cell: dict[str, Any]) -> dict[str, Any]:
    """Issue #17's shape: EfficientNet-Lite1 into Lite0 (ImageNet weights, new heads), Fashion-MNIST at 64 px."""
    from benchmarks.datasets import class_split, load_fashion_mnist, subsample
    from benchmarks.real_weights import load_efficientnet_lite
    from benchmarks.real_weights_row import fine_tune_head, split_at

    size, per_class = 64, cell["examples"] // 3
    train, test = load_fashion_mnist()
    train = subsample(train, per_class=200 + per_class, seed=0)
    split = split_at(class_split(train, test, clone_level=per_class, replay_per_class=20, seed=0), size)
    target = fine_tune_head(
        load_efficientnet_lite(0, len(split.target_classes), size), subsample(split.target_train, per_class=200)
    )
    source = fine_tune_head(
        load_efficientnet_lite(1, len(split.source_classes), size), subsample(split.source_train, per_class=200)
    )
    return {
        "source": source,
        "target": target,
        "data": split.clone,
        "replay": split.replay,
        "config": cell.get("config", {}),
        "classes": list(split.clone_source_ids),
    }


def _peak() -> int:
    """This process's peak resident set so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _report_peaks(every: float = 10.0) -> None:
    """Print the peak so far every ``every`` seconds (a cell stopped by its timeout still tells it)."""
    while True:
        time.sleep(every)
        print(json.dumps({"peak_rss_so_far": _peak()}), flush=True)


def _child(cell: dict[str, Any]) -> dict[str, Any]:
    """Build the cell, then clone once; what it measured (peak and pre-clone resident set, model sizes, time)."""
    import torch

    torch.set_num_threads(1)
    threading.Thread(target=_report_peaks, daemon=True).start()
    from pnc_surgery import CloneConfig, InvalidInputError, clone

    built = (_real_weights if cell["pair"] == "real_weights" else _synthetic)(cell)
    source, target = built["source"], built["target"]
    batch = max(CloneConfig().feature_batch_size, CloneConfig().batch_size)
    first = built["data"][0][0][None]
    result: dict[str, Any] = {
        "parameter_bytes": 4 * sum(p.numel() for m in (source, target) for p in m.parameters()),
        "activation_bytes": batch * sum(activation_bytes(m, first) for m in (source, target)),
        "rss_before": _rss(),
    }
    started = time.perf_counter()
    try:
        patch = clone(
            source,
            target,
            built["data"],
            classes=built.get("classes"),
            replay=built["replay"],
            config=CloneConfig(**built["config"]),
            progress=False,
        )
        result.update(ok=True, cut=patch.metrics["cut"], insertion=patch.metrics["insertion"])
        result["memory_skipped"] = patch.metrics.get("memory_skipped")
    except (RuntimeError, MemoryError, InvalidInputError) as exc:  # out of memory, or refused for its budget
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    result["seconds"] = time.perf_counter() - started
    result["peak_rss"] = _peak()
    return result


def measure(cell: dict[str, Any], cap_gb: float, timeout: float, code: Path | None = None) -> dict[str, Any]:
    """Run ``cell`` in a subprocess under an address-space cap of ``cap_gb`` and ``timeout`` seconds.

    Args:
        code: a checkout whose ``pnc_surgery`` the child imports instead of this one's.
    """
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(str(p) for p in (code, root) if p is not None)
    cap = int(cap_gb * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cell)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=limit,
            env={**os.environ, "PYTHONPATH": path},
        )
    except subprocess.TimeoutExpired as stopped:
        reports = _reports(stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or "")
        peak = max((r.get("peak_rss_so_far", 0) for r in reports), default=0) / 2**30
        return {**cell, "ok": False, "error": f"timed out after {timeout:.0f} s (peak RSS so far {peak:.2f} GB)"}
    results = [r for r in _reports(done.stdout) if "ok" in r]
    if not results:
        return {**cell, "ok": False, "error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return {**cell, **results[-1]}


def _reports(stdout: str) -> list[dict[str, Any]]:
    """The JSON lines a child printed."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _row(result: dict[str, Any]) -> str:
    gb = 2**30
    if "peak_rss" not in result:
        return (
            f"| {result['pair']} | {result['image_size']} | {result['examples']} | - | - | - | - | {result['error']} |"
        )
    used = (result["peak_rss"] - result["rss_before"]) / gb
    allowed = result["memory_gb"] + 2 * (result["parameter_bytes"] + result["activation_bytes"]) / gb
    verdict = ("yes" if used <= allowed else "**no**") if result["ok"] else result["error"]
    return (
        f"| {result['pair']} | {result['image_size']} | {result['examples']} | {result['peak_rss'] / gb:.2f} | "
        f"{used:.2f} | {allowed:.2f} | {result['seconds']:.0f} | {verdict} |"
    )


HEADER = [
    "| pair | px | images | peak RSS (GB) | peak - before clone (GB) | allowed (GB) | clone s | within |",
    "|---|---|---|---|---|---|---|---|",
]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clone_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--examples", nargs="+", type=int, default=[100, 1000, 5000])
    parser.add_argument("--memory-gb", type=float, default=0.5, help="CloneConfig(memory_gb=...) of every cell")
    parser.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap of each child")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each cell may run")
    parser.add_argument("--real-weights", action="store_true", help="issue #17's shape instead of the grid")
    parser.add_argument("--config", type=json.loads, default={}, help="CloneConfig overrides (JSON) of --real-weights")
    parser.add_argument("--code", type=Path, help="checkout whose pnc_surgery the children import")
    parser.add_argument("--out", type=Path, help="folder for clone_memory.json / .md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.real_weights:
        memory_gb = args.config.get("memory_gb", 2.0)
        cells = [
            {"pair": "real_weights", "image_size": 64, "examples": 900, "memory_gb": memory_gb, "config": args.config}
        ]
    else:
        cells = [  # the cheaper cells first, so that a time limit leaves out the largest
            {"pair": pair, "image_size": size, "examples": examples, "memory_gb": args.memory_gb}
            for examples in sorted(args.examples)
            for size in sorted(args.sizes)
            for pair in args.pairs
        ]
    print("\n".join(HEADER), flush=True)
    results = []
    for cell in cells:
        results.append(measure(cell, args.cap_gb, args.timeout, args.code))
        print(_row(results[-1]), flush=True)
    wall = time.perf_counter() - started
    print(f"wall time {wall:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "clone_memory.json").write_text(json.dumps({"cells": results, "wall_seconds": wall}, indent=1))
        (args.out / "clone_memory.md").write_text("\n".join([*HEADER, *map(_row, results)]) + "\n")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        main()
