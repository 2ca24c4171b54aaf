"""The methods PNC is compared with: each a standard recipe, on the same data and budget.

* ``finetune``: the whole target, head grown to A + K (old rows from the target), cross-entropy on clone + replay.
* ``lwf``: Learning without Forgetting (Li & Hoiem 2016): fine-tuning plus distillation of the old classes'
  logits from the frozen original target on every training image, temperature 2.
* ``ewc``: Elastic Weight Consolidation (Kirkpatrick et al. 2017): fine-tuning plus
  ``lambda/2 * sum F_i (theta_i - theta*_i)^2`` over the target's old parameters, the diagonal empirical Fisher
  ``F`` estimated on the only target-domain data available (the replay set).
* ``lora``: LoRA through ``peft`` on every ``nn.Linear``/ungrouped ``nn.Conv2d`` of the target but the head; the
  grown head is trained in full (``modules_to_save``).
* ``ensemble``: the target and the whole source side by side; T's logits, then S's logits for K.

All trained baselines use :class:`~benchmarks.protocol.Hyper`'s step budget on
:attr:`~benchmarks.protocol.Context.joint_data` (clone data + replay set), so they see exactly what PNC sees.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import safetensors_bytes
from .models import count_parameters, head_name
from .protocol import Context, Method, Outcome, grow_head
from .training import logits_of, train_classifier

__all__ = ["BASELINES", "finetune", "lwf", "ewc", "lora", "ensemble", "Ensemble"]


def _new_row_params(ctx: Context) -> int:
    head = ctx.target.get_submodule(head_name(ctx.target))
    return ctx.num_new * (head.in_features + (1 if head.bias is not None else 0))


def _train_grown(ctx: Context, extra_loss=None, description: str = "finetune") -> tuple[nn.Module, float]:
    """The target with a grown head, fine-tuned on the joint data; and the seconds it took."""
    start = time.perf_counter()
    model = grow_head(ctx.target, head_name(ctx.target), ctx.num_new, ctx.seed)
    train_classifier(
        model,
        ctx.joint_data,
        steps=ctx.hyper.steps,
        lr=ctx.hyper.lr,
        batch_size=ctx.hyper.batch_size,
        seed=ctx.seed,
        progress=ctx.progress,
        extra_loss=extra_loss(model) if extra_loss else None,
        balanced=ctx.hyper.balanced,
        description=description,
    )
    return model, time.perf_counter() - start


def _full_model_outcome(ctx: Context, model: nn.Module, seconds: float, **notes) -> Outcome:
    """Every weight may have moved, so shipping the change means shipping the whole model."""
    return Outcome(model, model, _new_row_params(ctx), safetensors_bytes(model), seconds, None, dict(notes))


def finetune(ctx: Context) -> Outcome:
    """Full fine-tuning of the target with its head grown to A + K."""
    model, seconds = _train_grown(ctx)
    return _full_model_outcome(ctx, model, seconds)


def lwf(ctx: Context) -> Outcome:
    """Fine-tuning plus distillation of the original target's old-class logits (temperature ``T``)."""
    teacher = ctx.original_target
    temperature, weight, num_old = ctx.hyper.lwf_temperature, ctx.hyper.lwf_weight, ctx.num_old

    def distillation(_model: nn.Module):
        def loss(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                old = logits_of(teacher(x))
            return (
                weight
                * temperature**2
                * F.kl_div(
                    F.log_softmax(logits[:, :num_old] / temperature, dim=1),
                    F.softmax(old / temperature, dim=1),
                    reduction="batchmean",
                )
            )

        return loss

    model, seconds = _train_grown(ctx, distillation, "lwf")
    return _full_model_outcome(ctx, model, seconds, temperature=temperature, weight=weight)


def _fisher_diagonal(model: nn.Module, ctx: Context) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the original target on the replay set (per-example squared gradients)."""
    fisher = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    images, labels = ctx.split.replay.images, ctx.split.replay.labels
    model.eval()  # BatchNorm statistics stay as they are; one image per step
    for x, y in zip(images, labels):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits_of(model(x[None])), y[None]).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                fisher[name] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {name: f / len(images) for name, f in fisher.items()}


def ewc(ctx: Context) -> Outcome:
    """Fine-tuning plus an EWC penalty that anchors the target's old parameters (old head rows included)."""
    start = time.perf_counter()
    reference = copy.deepcopy(ctx.target)
    fisher = _fisher_diagonal(reference, ctx)
    anchors = {name: p.detach().clone() for name, p in reference.named_parameters()}
    lam = ctx.hyper.ewc_lambda

    def penalty(model: nn.Module):
        params = dict(model.named_parameters())

        def loss(_x: torch.Tensor, _logits: torch.Tensor) -> torch.Tensor:
            total = torch.zeros(())
            for name, anchor in anchors.items():
                current = params[name][tuple(slice(0, s) for s in anchor.shape)]  # old rows of a grown head
                total = total + (fisher[name] * (current - anchor) ** 2).sum()
            return lam / 2 * total

        return loss

    model, _ = _train_grown(ctx, penalty, "ewc")
    return _full_model_outcome(ctx, model, time.perf_counter() - start, ewc_lambda=lam)


def _lora_targets(model: nn.Module, head: str) -> list[str]:
    """Names of the layers peft's LoRA supports and merges: linears and ungrouped 2-D convs, minus the head."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and name != head
        and (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1))
    ]


class _AdapterDisabled(nn.Module):
    """A PeftModel run with its adapters (and ``modules_to_save`` copies) switched off: LoRA's undo.

    The base head was grown before wrapping, so only its first ``num_old`` logits are the target's.
    """

    def __init__(self, peft_model: nn.Module, num_old: int):
        super().__init__()
        self.peft_model, self.num_old = peft_model, num_old

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.peft_model.disable_adapter():
            return logits_of(self.peft_model(x))[:, : self.num_old]


def lora(ctx: Context) -> Outcome:
    """LoRA (rank ``r``, alpha ``2r``) on the target's linears and convs; the grown head trained in full."""
    from peft import LoraConfig, get_peft_model

    start = time.perf_counter()
    head = head_name(ctx.target)
    grown = grow_head(ctx.target, head, ctx.num_new, ctx.seed)
    config = LoraConfig(
        r=ctx.hyper.lora_rank,
        lora_alpha=2 * ctx.hyper.lora_rank,
        lora_dropout=0.0,
        target_modules=_lora_targets(grown, head),
        modules_to_save=[head],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        model = get_peft_model(grown, config)
    train_classifier(
        model,
        ctx.joint_data,
        steps=ctx.hyper.steps,
        lr=ctx.hyper.lora_lr,
        batch_size=ctx.hyper.batch_size,
        seed=ctx.seed,
        progress=ctx.progress,
        balanced=ctx.hyper.balanced,
        description="lora",
    )
    seconds = time.perf_counter() - start
    lora_params = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)  # adapter_model.safetensors: LoRA factors + the trained head
        adapter_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    merged = copy.deepcopy(model).merge_and_unload().eval()
    return Outcome(
        model.eval(),
        merged,
        lora_params + _new_row_params(ctx),
        adapter_bytes,
        seconds,
        release=lambda: _AdapterDisabled(model, ctx.num_old).eval(),
        notes={
            "rank": ctx.hyper.lora_rank,
            "adapted_layers": len(config.target_modules),
            "params_changed_counted_on": "merged weights (W + BA)",
        },
    )


class Ensemble(nn.Module):
    """T and S side by side: T's logits, then S's logits at the clone classes' source indices."""

    def __init__(self, target: nn.Module, source: nn.Module, source_ids: tuple[int, ...]):
        super().__init__()
        self.target, self.source = target, source
        self.register_buffer("source_ids", torch.tensor(source_ids), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([logits_of(self.target(x)), logits_of(self.source(x))[:, self.source_ids]], dim=1)


def ensemble(ctx: Context) -> Outcome:
    """No training: run the whole source next to the target."""
    model = Ensemble(ctx.target, ctx.source, ctx.split.clone_source_ids).eval()
    return Outcome(
        model,
        ctx.target,
        count_parameters(ctx.source),
        safetensors_bytes(ctx.source),
        0.0,
        release=lambda: ctx.target,
    )


BASELINES: dict[str, Method] = {
    "finetune": finetune,
    "lwf": lwf,
    "ewc": ewc,
    "lora": lora,
    "ensemble": ensemble,
}
"""Baselines by the name used in the table."""
