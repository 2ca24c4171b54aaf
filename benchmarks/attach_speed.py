"""Attach/detach cost and patched-forward cost of a Patch (issue: Patch performance).

Run: python -m benchmarks.attach_speed   (a few seconds; prints a markdown table)

Attach and detach are timed over many repetitions (the first attach, which also checks the target, is reported
separately); forward latency is the median of timed batches for the target alone, the patched target, and the
target and the whole source run side by side.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pnc_surgery import Patch
from pnc_surgery.backends.timm import create_model


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    source = create_model("resnet18", num_classes=5, in_chans=1, channels=(16, 32, 64, 128)).eval()
    target = create_model("resnet18", num_classes=5, in_chans=1, channels=(16, 32, 64, 128)).eval()
    x = torch.randn(args.batch, 1, 32, 32)
    patch = Patch.assemble(source, target, "layer3", "layer3", [0, 1, 2], source_input=x[:2], target_input=x[:2]).eval()

    start = time.perf_counter()
    patch.attach(target)
    first_attach = (time.perf_counter() - start) * 1e3
    patch.detach()
    attach_ms = _median_ms(lambda: (patch.attach(target), patch.detach()), args.repeats)
    patch.attach(target)
    detach_ms = _median_ms(lambda: (patch.detach(), patch.attach(target)), args.repeats)
    patch.detach()

    with torch.no_grad():
        alone = _median_ms(lambda: target(x), 30)
        both = _median_ms(lambda: (target(x), source(x)), 30)
        with patch.attached(target):
            patched = _median_ms(lambda: target(x), 30)
    print("| measure | value |\n|---|---|")
    print(f"| first attach (with checks) | {first_attach:.3f} ms |")
    print(f"| attach + detach (median) | {attach_ms:.3f} ms |")
    print(f"| detach + attach (median) | {detach_ms:.3f} ms |")
    print(f"| forward, target alone (batch {args.batch}) | {alone:.2f} ms |")
    print(f"| forward, patched target | {patched:.2f} ms ({patched / alone:.2f}x target, {patched / both:.2f}x target+source) |")
    print(f"| forward, target + source side by side | {both:.2f} ms |")


if __name__ == "__main__":
    main()
