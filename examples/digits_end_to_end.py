"""Clone digits 5, 6, 7 from a source into a target that knows 0-4, and check what changed.

Run: python examples/digits_end_to_end.py   (about a minute on 2 CPU cores, no network; needs pnc_surgery[demo])
"""

import torch

import pnc_surgery
from pnc_surgery.demo import digits_models

# Small timm resnets: the target learns 0-4, the source 5-9 (its class ids 0-4 stand for digits 5-9).
split, target, source = digits_models()
images, labels = split.test.tensors

with torch.no_grad():
    original = target(images)
patch = pnc_surgery.clone(source, target, split.clone, classes=split.clone_source_ids, replay=split.replay)
print(patch.summary())

with patch.attached(target), torch.no_grad():
    prediction = target(images).argmax(-1)  # 5 old columns + 3 cloned ones
old = labels < 5
print(f"accuracy on 0-4:  {(prediction[old] == labels[old]).float().mean():.3f}")
print(f"accuracy on 5-7:  {(prediction[~old] == labels[~old]).float().mean():.3f}")
print(f"locality:         {(prediction[old] == original[old].argmax(-1)).float().mean():.3f}")
with torch.no_grad():
    print(f"detached exactly: {torch.equal(target(images), original)}")
