"""A zoo of tiny, randomly initialised classifiers for the tests.

Every builder returns ``(model, example_input)`` with the model in eval mode and seeded weights, small enough that
the whole zoo builds and runs a forward in a few seconds on two CPU cores. Nothing is downloaded: timm models use
``pretrained=False`` and transformers models are built from a config.

``example_input`` is a tensor for timm models and a dict of model keyword arguments for transformers models
(``{"pixel_values": ...}`` or ``{"input_ids": ..., "attention_mask": ...}``).

The registry :data:`ZOO` maps a pytest id to a :class:`ZooEntry` that also states what the tests may expect of the
model: the fewest points ``find_points`` must find (at least one per stage), and module names that must not be points
because they are inside a block (cutting there loses the residual or the attention context).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pnc_surgery.backends.base import logits_of

__all__ = [
    "ZooEntry",
    "ZOO",
    "NUM_CLASSES",
    "build",
    "run_model",
    "logits_of",
    "other_input",
    "context_of",
    "cut_error",
    "tiny_bart",
    "tiny_t5",
]

NUM_CLASSES = 7
"""Every zoo classifier has this many classes (a number no default config uses)."""

_BATCH = 2


def _images(size: int = 32, channels: int = 3, batch: int = _BATCH) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(batch, channels, size, size, generator=g)


@torch.no_grad()
def _ready(model: nn.Module, calibrate_with: torch.Tensor | None = None) -> nn.Module:
    """Eval mode; with ``calibrate_with`` images, BatchNorm statistics are first set from a few random batches.

    Fresh BatchNorm layers (mean 0, variance 1) let activations shrink or blow up layer after layer, so random
    EfficientNet/Xception logits barely depend on the input; a test that compares logits with an absolute
    tolerance would then pass anything. Calibrated statistics keep the logits input-dependent.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if calibrate_with is not None and norms:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
        model.train()
        g = torch.Generator().manual_seed(4321)
        for _ in range(4):
            model(torch.randn(8, *calibrate_with.shape[1:], generator=g))
        for norm in norms:
            norm.momentum = 0.1
    return model.eval()


def _timm(name: str, size: int = 32, calibrate: bool = True, **kwargs: Any) -> tuple[nn.Module, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    images = _images(size)
    return _ready(model, images if calibrate else None), images


# ----------------------------------------------------------------------------------------------------- timm CNNs
def timm_resnet18() -> tuple[nn.Module, torch.Tensor]:
    """timm ResNet with BasicBlocks, two blocks a stage, widths 8..64."""
    return _timm("resnet18", channels=(8, 16, 32, 64), stem_width=8, zero_init_last=False)


def timm_resnet50() -> tuple[nn.Module, torch.Tensor]:
    """timm ResNet with Bottlenecks (expansion 4), one block a stage."""
    return _timm("resnet50", layers=(1, 1, 1, 1), channels=(4, 8, 16, 32), stem_width=8, zero_init_last=False)


def timm_efficientnet() -> tuple[nn.Module, torch.Tensor]:
    """timm EfficientNet-B0 architecture scaled down (channel x0.25, depth x0.5: stages 3-5 have a residual block)."""
    from timm.models.efficientnet import _gen_efficientnet

    torch.manual_seed(0)
    model = _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.5, num_classes=NUM_CLASSES)
    return _ready(model, _images(32)), _images(32)


def timm_mobilenetv3() -> tuple[nn.Module, torch.Tensor]:
    """timm MobileNetV3-Small x0.5 (squeeze-excite, hard-swish, a conv head after pooling)."""
    return _timm("mobilenetv3_small_050")


def timm_regnet() -> tuple[nn.Module, torch.Tensor]:
    """timm RegNetX-200MF (grouped convs, stages ``s1..s4``)."""
    return _timm("regnetx_002", zero_init_last=False)


def timm_convnext() -> tuple[nn.Module, torch.Tensor]:
    """timm ConvNeXt-atto scaled down (NCHW stages, norm in the head)."""
    return _timm("convnext_atto", depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))


def timm_xception(calibrate: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """timm Xception41 layout with tiny blocks: its ``feature_info`` hooks ``blocks.N.stack.act3``, which are not cuts.

    With ``calibrate=False`` the BatchNorm statistics stay fresh and the logits hardly depend on the input.
    """
    block_cfg = [
        dict(in_chs=64, out_chs=16, stride=2),
        dict(in_chs=16, out_chs=24, stride=2),
        dict(in_chs=24, out_chs=32, stride=2),
        dict(in_chs=32, out_chs=32, stride=1),
        dict(in_chs=32, out_chs=(32, 48, 48), stride=2),
        dict(in_chs=48, out_chs=(64, 64, 96), stride=1, no_skip=True, start_with_relu=False),
    ]
    return _timm("xception41", calibrate=calibrate, block_cfg=block_cfg)


# ------------------------------------------------------------------------------------------ timm transformers
def timm_vit() -> tuple[nn.Module, torch.Tensor]:
    """timm ViT: cls token + position embedding, 2 blocks, token features (NLC)."""
    return _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def timm_deit_distilled() -> tuple[nn.Module, torch.Tensor]:
    """timm DeiT distilled: two prefix tokens and two heads whose logits are averaged in eval mode."""
    return _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def timm_swin() -> tuple[nn.Module, torch.Tensor]:
    """timm Swin: windowed attention, patch merging, NHWC stage features."""
    return _timm(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 4),
    )


# ------------------------------------------------------------------------------------------------ transformers
def _hf(model_cls: Any, config: Any) -> nn.Module:
    torch.manual_seed(0)
    return _ready(model_cls(config))


def hf_vit() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """transformers ViTForImageClassification: 2 layers, hidden 32, 32x32 images in 8x8 patches."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=NUM_CLASSES,
    )
    return _hf(ViTForImageClassification, config), {"pixel_values": _images(32)}


def hf_deit() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """transformers DeiTForImageClassification (cls + distillation token, head on the cls token)."""
    from transformers import DeiTConfig, DeiTForImageClassification

    config = DeiTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=NUM_CLASSES,
    )
    return _hf(DeiTForImageClassification, config), {"pixel_values": _images(32)}


def hf_dinov2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """transformers Dinov2ForImageClassification (head on cls token concatenated with mean patch token)."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=32,
        patch_size=8,
        num_labels=NUM_CLASSES,
    )
    return _hf(Dinov2ForImageClassification, config), {"pixel_values": _images(32)}


def hf_convnext() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """transformers ConvNextForImageClassification, one block a stage, widths 8..64."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32, num_labels=NUM_CLASSES)
    return _hf(ConvNextForImageClassification, config), {"pixel_values": _images(32)}


def hf_resnet() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """transformers ResNetForImageClassification with basic blocks, one block a stage."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        num_labels=NUM_CLASSES,
    )
    return _hf(ResNetForImageClassification, config), {"pixel_values": _images(32)}


_VOCAB = 100
_SEQ = 12


def _text_batch() -> dict[str, torch.Tensor]:
    """Two sequences of length 12; the second is 5 real tokens then padding (id 0, mask 0)."""
    g = torch.Generator().manual_seed(99)
    input_ids = torch.randint(5, _VOCAB, (2, _SEQ), generator=g)
    attention_mask = torch.ones(2, _SEQ, dtype=torch.long)
    input_ids[1, 5:] = 0
    attention_mask[1, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def hf_bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """transformers BertForSequenceClassification, 2 layers, hidden 32; the example batch has a padded row."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=NUM_CLASSES,
    )
    return _hf(BertForSequenceClassification, config), _text_batch()


def hf_distilbert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """transformers DistilBertForSequenceClassification, 2 layers, dim 32; the example batch has a padded row."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=_VOCAB,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=64,
        num_labels=NUM_CLASSES,
    )
    return _hf(DistilBertForSequenceClassification, config), _text_batch()


def tiny_bart(vocab_size: int = _VOCAB, num_labels: int = NUM_CLASSES, decoder_layers: int = 2) -> nn.Module:
    """A transformers BartForSequenceClassification, 2 encoder layers of width 32 (eval mode, seeded): its decoder
    embeds the token ids itself. Pad id 0, eos id 1 (every text must end with it: the head pools the last eos)."""
    from transformers import BartConfig, BartForSequenceClassification

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=decoder_layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        decoder_start_token_id=1,
    )
    return BartForSequenceClassification(config).eval()


def tiny_t5() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A transformers T5ForSequenceClassification, 3 encoder and 3 decoder blocks of width 32 (eval mode, seeded),
    and a padded batch ending in eos: its first block of each stack makes the position bias the later ones are
    given, its decoder reads the encoder's output, and one dropout module serves a stack's start and end."""
    from transformers import T5Config, T5ForSequenceClassification

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        num_labels=NUM_CLASSES,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 8:], mask[1, 8:] = 0, 0
    ids[0, 11], ids[1, 7] = 1, 1
    return T5ForSequenceClassification(config).eval(), {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ZooEntry:
    """One zoo model and what the tests may expect of it.

    Attributes:
        builder: Returns ``(model, example_input)``, the model in eval mode.
        min_points: ``find_points`` must return at least this many points (one per stage or layer at least).
        not_points: ``named_modules()`` names inside a block; none of them may be a point.
        layouts: The layouts the points may have.
        text: The model takes token ids and an attention mask.
    """

    builder: Callable[[], tuple[nn.Module, Any]]
    min_points: int
    not_points: tuple[str, ...] = ()
    layouts: frozenset[str] = field(default_factory=lambda: frozenset({"NCHW"}))
    text: bool = False


_TOKENS = frozenset({"NLC"})
_PATCHES = frozenset({"NLC", "NCHW"})  # image transformers: the patch-embedding conv outputs a feature map

ZOO: dict[str, ZooEntry] = {
    # 4 stages
    "timm_resnet18": ZooEntry(
        timm_resnet18, 4, ("layer1.0.conv1", "layer1.0.bn1", "layer2.1.conv2", "layer3.0.downsample")
    ),
    "timm_resnet50": ZooEntry(timm_resnet50, 4, ("layer1.0.conv2", "layer2.0.bn3", "layer4.0.downsample.0")),
    # 7 block stages (blocks.0 .. blocks.6)
    "timm_efficientnet": ZooEntry(timm_efficientnet, 7, ("blocks.3.1.conv_pw", "blocks.3.1.bn1", "blocks.4.1.se")),
    # 6 block stages (blocks.0 .. blocks.5)
    "timm_mobilenetv3": ZooEntry(timm_mobilenetv3, 5, ("blocks.2.1.conv_pw", "blocks.2.1.se", "blocks.4.1.bn2")),
    # 4 stages s1..s4
    "timm_regnet": ZooEntry(timm_regnet, 4, ("s1.b1.conv1", "s2.b1.conv2", "s3.b1.downsample")),
    # 4 stages
    "timm_convnext": ZooEntry(
        timm_convnext, 4, ("stages.0.blocks.0.conv_dw", "stages.2.blocks.1.norm", "stages.1.blocks.0.mlp")
    ),
    # 6 blocks; feature_info hooks blocks.N.stack.act3, not a cut (the block's shortcut is added after it)
    "timm_xception": ZooEntry(
        timm_xception, 5, ("blocks.0.stack.act3", "blocks.1.stack.act3", "blocks.2.stack.act3", "blocks.4.stack.act3")
    ),
    # 2 transformer blocks
    "timm_vit": ZooEntry(
        timm_vit, 2, ("blocks.0.attn", "blocks.0.norm1", "blocks.1.mlp", "blocks.1.attn.qkv"), _PATCHES
    ),
    "timm_deit_distilled": ZooEntry(timm_deit_distilled, 2, ("blocks.0.attn", "blocks.1.mlp"), _PATCHES),
    # 4 stages; timm swin stages output NHWC
    "timm_swin": ZooEntry(
        timm_swin,
        4,
        ("layers.0.blocks.0.attn", "layers.2.blocks.1.mlp", "layers.1.blocks.0.norm1"),
        frozenset({"NHWC", "NLC", "NCHW"}),
    ),
    "hf_vit": ZooEntry(
        hf_vit, 2, ("vit.layers.0.attention", "vit.layers.1.mlp", "vit.layers.0.layernorm_before"), _PATCHES
    ),
    "hf_deit": ZooEntry(hf_deit, 2, ("deit.layers.0.attention", "deit.layers.1.mlp"), _PATCHES),
    "hf_dinov2": ZooEntry(hf_dinov2, 2, ("dinov2.encoder.layer.0.attention", "dinov2.encoder.layer.1.mlp"), _PATCHES),
    "hf_convnext": ZooEntry(
        hf_convnext, 4, ("convnext.encoder.stages.0.layers.0.dwconv", "convnext.encoder.stages.1.layers.0.layernorm")
    ),
    "hf_resnet": ZooEntry(
        hf_resnet, 4, ("resnet.encoder.stages.0.layers.0.layer.0", "resnet.encoder.stages.1.layers.0.shortcut")
    ),
    "hf_bert": ZooEntry(
        hf_bert, 2, ("bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.intermediate"), _TOKENS, text=True
    ),
    "hf_distilbert": ZooEntry(
        hf_distilbert,
        2,
        ("distilbert.transformer.layer.0.attention", "distilbert.transformer.layer.1.ffn"),
        _TOKENS,
        text=True,
    ),
}


def build(name: str) -> tuple[nn.Module, Any]:
    """Build the zoo model ``name``: ``(model in eval mode, example_input)``."""
    return ZOO[name].builder()


def run_model(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` on ``example_input`` (a tensor, or a dict of keyword arguments)."""
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


# ------------------------------------------------------------------------------------------- probing helpers
def other_input(example_input: Any, batch: int | None = None, seed: int = 5) -> Any:
    """A different input of the same kind as ``example_input`` (optionally another batch size).

    Images are redrawn. Token ids are redrawn at the unmasked positions only; with ``batch`` given, the rows
    cycle through the example's attention masks, so padding stays where the example has it.
    """
    g = torch.Generator().manual_seed(seed)
    if isinstance(example_input, torch.Tensor):
        shape = example_input.shape if batch is None else (batch, *example_input.shape[1:])
        return torch.randn(shape, generator=g)
    if "pixel_values" in example_input:
        pixels = example_input["pixel_values"]
        shape = pixels.shape if batch is None else (batch, *pixels.shape[1:])
        return {**example_input, "pixel_values": torch.randn(shape, generator=g)}
    ids, mask = example_input["input_ids"], example_input["attention_mask"]
    if batch is not None:
        rows = torch.arange(batch) % ids.shape[0]
        ids, mask = ids[rows], mask[rows]
    fresh = torch.randint(5, _VOCAB, ids.shape, generator=g)
    return {"input_ids": torch.where(mask.bool(), fresh, ids), "attention_mask": mask.clone()}


def context_of(example_input: Any) -> dict[str, torch.Tensor]:
    """The keyword context a tail needs besides the feature (the attention mask of text inputs)."""
    if isinstance(example_input, dict) and "attention_mask" in example_input:
        return {"attention_mask": example_input["attention_mask"]}
    return {}


@torch.no_grad()
def cut_error(model: nn.Module, name: str, example_input: Any) -> float:
    """How far module ``name`` is from being a cut (0: a cut; about 1: the rest ignores it).

    Runs a second input with a hook that replaces ``name``'s first output by the example input's; if everything
    after ``name`` depends on that output alone, the model answers as for the example input. Returns the largest
    logit difference to the example's logits, relative to how far the two inputs' logits differ.
    """
    module = dict(model.named_modules())[name]
    kept: list[Any] = []

    def keep(_m: nn.Module, _i: Any, out: Any) -> None:
        if not kept:
            kept.append(out.clone() if isinstance(out, torch.Tensor) else out)

    handle = module.register_forward_hook(keep)
    try:
        y1 = logits_of(run_model(model, example_input))
    finally:
        handle.remove()
    x2 = other_input(example_input)
    y2 = logits_of(run_model(model, x2))
    calls = [0]

    def substitute(_m: nn.Module, _i: Any, out: Any) -> Any:
        calls[0] += 1
        return kept[0] if calls[0] == 1 else None

    handle = module.register_forward_hook(substitute)
    try:
        y_sub = logits_of(run_model(model, x2))
    finally:
        handle.remove()
    return ((y_sub - y1).abs().max() / (y2 - y1).abs().max()).item()
