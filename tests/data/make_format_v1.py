"""How tests/data/format_v1_* were written: pnc_surgery at format_version 1 (commit bfcd668), run from the repo root with PYTHONPATH=.:tests."""

import json

import torch

torch.set_num_threads(1)
from test_patch import hf_bert, images, text, timm_resnet

from pnc_surgery.patch import Patch

out = "tests/data"
source, target = timm_resnet(0, 5), timm_resnet(1)
x = images(2, 0)
p = Patch.assemble(source, target, "layer3", "layer2", [1, 3], source_input=x, target_input=x)
p.save_pretrained(f"{out}/format_v1_resnet")

with torch.no_grad(), p.attached(target):
    y = target(images(3, 1))
json.dump({"input_seed": 1, "batch": 3, "logits": y.tolist()}, open(f"{out}/format_v1_resnet_expected.json", "w"))
s, t = hf_bert(0, 5), hf_bert(1)
inp = text(2, 0)
q = Patch.assemble(s, t, "bert.encoder.layer.0", "bert.encoder.layer.0", [0, 3], source_input=inp, target_input=inp)
q.save(f"{out}/format_v1_bert.safetensors")
inp2 = text(3, 1)
with torch.no_grad(), q.attached(t):
    z = t(**inp2).logits
json.dump({"input_seed": 1, "batch": 3, "logits": z.tolist()}, open(f"{out}/format_v1_bert_expected.json", "w"))
