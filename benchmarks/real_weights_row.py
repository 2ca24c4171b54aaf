"""PNC beside fine-tuning, LwF and EWC on real pretrained weights: ``python -m benchmarks.real_weights_row``.

The target is EfficientNet-Lite0 and the source EfficientNet-Lite1, both with their real ImageNet weights
(:func:`benchmarks.real_weights.load_efficientnet_lite`) and a new head fine-tuned on their frozen features: the
target on Fashion-MNIST's A = 0-4, the source on B = 5-9 (``--train-per-class`` images each), at 64 px. PNC clones
K = 5, 6, 7 from ``--clone-per-class`` images each with 20 replay images per class of A; the baselines get the same
data and the main benchmark's hyperparameters for ``--steps`` steps. Test: ``--test-per-class`` images per class
of A and K. Writes ``real_weights.json`` and ``real_weights.md`` to ``--out``::

    python -m benchmarks.real_weights_row --out results/real_weights
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pnc_surgery.clone import CloneConfig, clone
from pnc_surgery.data import to_view

from .baselines import BASELINES
from .datasets import ClassSplit, ImageDataset, class_split, load_fashion_mnist, subsample
from .metrics import accuracy_metrics, patch_bytes, patch_part_bytes, safetensors_bytes
from .pair_matrix import fit_evidence, gate_inputs, gate_outcome, refit_gate
from .protocol import Context, Hyper
from .real_weights import load_efficientnet_lite
from .training import predict_logits, torch_threads

__all__ = ["fine_tune_head", "main", "split_at"]

logger = logging.getLogger("benchmarks.real_weights_row")

IMAGE_SIZE = 64
BASELINE_ROWS = ("finetune", "lwf", "ewc")


def split_at(split: ClassSplit, image_size: int) -> ClassSplit:
    """``split`` with every image resized to ``image_size`` and repeated to three channels (as ImageNet models take)."""

    def view(data: ImageDataset) -> ImageDataset:
        return data.with_tensors(to_view(data.images, 3, (image_size, image_size)).contiguous(), data.labels)

    return replace(
        split,
        target_train=view(split.target_train),
        source_train=view(split.source_train),
        clone=view(split.clone),
        replay=view(split.replay),
        test=view(split.test),
    )


@torch.no_grad()
def _features(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x in images.split(batch_size)])


def fine_tune_head(model: nn.Module, data: ImageDataset, steps: int = 300, seed: int = 0) -> nn.Module:
    """Train ``model``'s (new) classifier on its frozen pretrained features, computed once; returns it in eval mode."""
    features = _features(model.eval(), data.images)
    head = model.get_classifier()
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(features), (128,), generator=generator)
        loss = F.cross_entropy(head(features[batch]), data.labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_weights_row", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--clone-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every trained baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/real_weights"))
    parser.add_argument(
        "--clone-config",
        default="{}",
        help='JSON of CloneConfig settings (default: the library\'s; the first run used {"search_positions": false, '
        '"train_steps": 150})',
    )
    parser.add_argument(
        "--baselines", nargs="*", default=list(BASELINE_ROWS), choices=BASELINE_ROWS, help="baselines to run beside PNC"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with torch_threads(1):
        train, test = load_fashion_mnist()
        train = subsample(train, per_class=args.train_per_class + args.clone_per_class, seed=args.seed)
        test = subsample(test, per_class=args.test_per_class, seed=0)
        split = split_at(
            class_split(train, test, clone_level=args.clone_per_class, replay_per_class=20, seed=args.seed), IMAGE_SIZE
        )
        torch.manual_seed(args.seed)  # the new heads start from the global generator
        target = fine_tune_head(
            load_efficientnet_lite(0, len(split.target_classes)),
            subsample(split.target_train, per_class=args.train_per_class, seed=args.seed),
        )
        source = fine_tune_head(
            load_efficientnet_lite(1, len(split.source_classes)),
            subsample(split.source_train, per_class=args.train_per_class, seed=args.seed),
        )
        labels, num_old = split.test.labels, split.num_old
        reference = predict_logits(target, split.test).argmax(1)
        logger.info("heads fine-tuned (%.0f s)", time.perf_counter() - started)

        start = time.perf_counter()
        config = CloneConfig(**json.loads(args.clone_config))
        patch = clone(
            source,
            target,
            split.clone,
            classes=list(split.clone_source_ids),
            replay=split.replay,
            config=config,
            seed=args.seed,
            progress=False,
        )
        seen, gate_share = gate_inputs(patch, target, split.test)
        source_bytes = safetensors_bytes(source)
        rows.append(
            {
                "method": "pnc",
                "seconds": time.perf_counter() - start,
                "gate_share": gate_share,
                "patch_bytes_x_source": patch_bytes(patch) / source_bytes,
                **{f"{part}_bytes_x_source": n / source_bytes for part, n in patch_part_bytes(patch).items()},
                **gate_outcome(patch.gate, seen, labels, num_old),
                "cut": patch.metrics.get("cut"),
                "insertion": patch.metrics.get("insertion"),
            }
        )
        gate, _ = refit_gate("learned", fit_evidence(patch, target, split), config.max_false_positive_rate, args.seed)
        rows.append({"method": "pnc_learned_gate", **gate_outcome(gate, seen, labels, num_old)})
        for name in args.baselines:
            start = time.perf_counter()
            ctx = Context(source, copy.deepcopy(target), target, split, Hyper(steps=args.steps), args.seed, False)
            logits = predict_logits(BASELINES[name](ctx).model, split.test)
            rows.append(
                {
                    "method": name,
                    "seconds": time.perf_counter() - start,
                    **accuracy_metrics(logits, labels, num_old, reference),
                }
            )
            logger.info("%s done", name)
    for row in rows:
        row.setdefault("acc_k", row.get("acc_new"))
    document = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "target_acc_a": (reference[labels < num_old] == labels[labels < num_old]).float().mean().item(),
        "wall_seconds": time.perf_counter() - started,
    }
    lines = ["| method | acc_all | acc on K | locality | patch bytes (x source) |", "|---|---|---|---|---|"]

    def size(row: dict[str, Any]) -> str:
        if "patch_bytes_x_source" not in row:
            return ""
        return f"{row['patch_bytes_x_source']:.3f} (gate {row.get('gate_bytes_x_source', 0.0):.3f})"

    lines += [
        f"| {r['method']} | {100 * r['acc_all']:.1f} | {100 * r['acc_k']:.1f} | {100 * r['locality']:.1f} | {size(r)} |"
        for r in rows
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_weights.json").write_text(json.dumps(document, indent=1))
    (args.out / "real_weights.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"target accuracy on A {100 * document['target_acc_a']:.1f}; wall time {document['wall_seconds']:.0f} s")
    return document


if __name__ == "__main__":
    main()
