"""Save a patch, load it back without the source model, and attach it to the target.

Run: python examples/save_reload_attach.py   (about a minute on 2 CPU cores, no network; needs pnc_surgery[demo])
"""

import tempfile

import torch

import pnc_surgery
from pnc_surgery.demo import DEMO_CLONE_CONFIG, digits_models

split, target, source = digits_models()
images = split.test.tensors[0]
patch = pnc_surgery.clone(
    source, target, split.clone, classes=split.clone_source_ids, replay=split.replay, config=DEMO_CLONE_CONFIG
)
with patch.attached(target), torch.no_grad():
    expected = target(images)

with tempfile.TemporaryDirectory() as tmp:
    folder = patch.save_pretrained(f"{tmp}/digits-5-6-7")  # patch_config.json, patch_model.safetensors, README.md
    del source, patch  # the patch needs neither again
    patch = pnc_surgery.Patch.from_pretrained(folder)  # or "user/repo" after patch.push_to_hub("user/repo")
    print(patch.summary())
    patch.save(f"{tmp}/digits.safetensors")  # single-file form (config in the metadata)
    single = pnc_surgery.Patch.load(f"{tmp}/digits.safetensors")

for loaded in (patch, single):
    with loaded.attached(target), torch.no_grad():
        print("same outputs after reload:", torch.equal(target(images), expected))
