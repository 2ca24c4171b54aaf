"""Save a patch, load it back without the source model, and attach it to the target.

Run: python examples/save_reload_attach.py   (about a minute on 2 CPU cores, no network)
"""
import tempfile

import torch

import pnc_surgery
from pnc_surgery.demo import DEMO_CLONE_CONFIG, digits_models
from pnc_surgery.training import predict_logits

split, target, source = digits_models()
patch = pnc_surgery.clone(source, target, split.clone, classes=split.clone_source_ids, replay=split.replay, config=DEMO_CLONE_CONFIG)
with patch.attached(target):
    expected = predict_logits(target, split.test)

with tempfile.TemporaryDirectory() as tmp:
    folder = patch.save_pretrained(f"{tmp}/digits-5-6-7")   # patch_config.json, patch_model.safetensors, README.md
    del source, patch                                        # the patch needs neither again
    patch = pnc_surgery.Patch.from_pretrained(folder)        # or "user/repo" after patch.push_to_hub("user/repo")
    print(patch.summary())
    patch.save(f"{tmp}/digits.safetensors")                  # single-file form (config in the metadata)
    single = pnc_surgery.Patch.load(f"{tmp}/digits.safetensors")

for loaded in (patch, single):
    with loaded.attached(target):
        print("same outputs after reload:", torch.equal(predict_logits(target, split.test), expected))
