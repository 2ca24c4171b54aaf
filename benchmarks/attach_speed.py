"""Attach/detach cost and patched-forward cost of a Patch (issue: Patch performance).

Run: python -m benchmarks.attach_speed   (a few seconds; prints a markdown table)
     python -m benchmarks.attach_speed --model resnet50 --image-size 224 --batch 8 --cut layer4   (a real size)
     python -m benchmarks.attach_speed --model resnet50 --image-size 224 --batch 8 --cut act1 --keep-ratio 0.2

Attach and detach are timed over many repetitions (the first attach, which also checks the target, is reported
separately); forward latency is the median of timed batches for the target alone, the patched target, and the
target and the whole source run side by side. ``--keep-ratio`` prunes the branch's hidden units to that share, as
localization does (which units are kept does not matter for the cost, so they are not ranked).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pnc_surgery import Patch
from pnc_surgery.backends.timm import create_model
from pnc_surgery.branch import capture_features
from pnc_surgery.localize import find_prune_groups, keep_indices, prune


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
    parser.add_argument(
        "--model", default=None, help="timm model name for source and target (default: a small resnet18)"
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cut", default="layer3", help="cut point of the source and insertion point of the target")
    parser.add_argument("--keep-ratio", type=float, default=1.0, help="share of the branch's hidden units to keep")
    parser.add_argument("--forward-repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model is None:

        def build() -> torch.nn.Module:
            return create_model("resnet18", num_classes=5, in_chans=1, channels=(16, 32, 64, 128)).eval()

        channels = 1
    else:

        def build() -> torch.nn.Module:
            return create_model(args.model, num_classes=5).eval()

        channels = 3
    source, target = build(), build()
    x = torch.randn(args.batch, channels, args.image_size, args.image_size)
    patch = Patch.assemble(source, target, args.cut, args.cut, [0, 1, 2], source_input=x[:2], target_input=x[:2]).eval()
    if args.keep_ratio < 1:
        feature = capture_features(source, [args.cut], x[:2])[args.cut]
        groups = find_prune_groups(patch.branch, feature)
        prune(
            patch.branch,
            groups,
            keep_indices(groups, {g.consumer: torch.ones(g.size) for g in groups}, args.keep_ratio),
        )

    start = time.perf_counter()
    patch.attach(target)
    first_attach = (time.perf_counter() - start) * 1e3
    patch.detach()
    attach_ms = _median_ms(lambda: (patch.attach(target), patch.detach()), args.repeats)
    patch.attach(target)
    detach_ms = _median_ms(lambda: (patch.detach(), patch.attach(target)), args.repeats)
    patch.detach()

    with torch.no_grad():
        alone = _median_ms(lambda: target(x), args.forward_repeats)
        both = _median_ms(lambda: (target(x), source(x)), args.forward_repeats)
        with patch.attached(target):
            patched = _median_ms(lambda: target(x), args.forward_repeats)
    print("| measure | value |\n|---|---|")
    print(
        f"| branch | cut {args.cut}, keep ratio {args.keep_ratio}, "
        f"{sum(p.numel() for p in patch.branch.parameters()):,} parameters "
        f"(source {sum(p.numel() for p in source.parameters()):,}) |"
    )
    print(f"| first attach (with checks) | {first_attach:.3f} ms |")
    print(f"| attach + detach (median) | {attach_ms:.3f} ms |")
    print(f"| detach + attach (median) | {detach_ms:.3f} ms |")
    print(f"| forward, target alone (batch {args.batch}) | {alone:.2f} ms |")
    print(
        f"| forward, patched target | {patched:.2f} ms "
        f"({patched / alone:.2f}x target, {patched / both:.2f}x target+source) |"
    )
    print(f"| forward, target + source side by side | {both:.2f} ms |")


if __name__ == "__main__":
    main()
