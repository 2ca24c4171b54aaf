"""A timm CNN source cloned into a transformers ViT target: layouts (NCHW -> tokens + cls) are adapted for you.

Run: python examples/timm_into_transformers.py   (no network: models built from configs; needs pnc_surgery[demo])
"""

import torch
from transformers import ViTConfig, ViTForImageClassification

import pnc_surgery
from pnc_surgery.backends.timm import create_model
from pnc_surgery.demo import digits_split, train_classifier

torch.manual_seed(0)
split = digits_split()  # target: digits 0-4; source: 5-9; clone: 5, 6, 7
images, labels = split.test.tensors

target = ViTForImageClassification(
    ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=5,
    )
)
source = create_model("resnet18", num_classes=5, in_chans=1, channels=(16, 32, 64, 128))
train_classifier(target, split.target_train, epochs=15)
train_classifier(source, split.source_train, epochs=8, seed=1)

# The gate's budget trades the target's own answers for the cloned classes: clone with two settings.
patches = {
    budget: pnc_surgery.clone(
        source,
        target,
        split.clone,
        classes=split.clone_source_ids,
        replay=split.replay,
        config=pnc_surgery.CloneConfig(max_false_positive_rate=budget),
    )
    for budget in (0.01, 0.05)
}
print(patches[0.01].summary())
with patches[0.01].attached(target):
    output = target(pixel_values=images[:4])  # the same ImageClassifierOutput, wider logits
print(type(output).__name__, tuple(output.logits.shape))

with torch.no_grad():
    original = target(pixel_values=images).logits.argmax(-1)
new, old = labels >= 5, labels < 5
for budget, patch in patches.items():
    with patch.attached(target), torch.no_grad():
        prediction = target(pixel_values=images).logits.argmax(-1)
    accuracy = (prediction[new] == labels[new]).float().mean()
    kept = (prediction[old] == original[old]).float().mean()
    print(f"max_false_positive_rate={budget}: cloned classes right {accuracy:.3f}, target's answers kept {kept:.3f}")
