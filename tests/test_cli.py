"""Specification of the ``pnc-surgery`` command line (points, clone, demo; push/info live in test_hub.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from pnc_surgery.backends.timm import create_model
from pnc_surgery.cli import main
from pnc_surgery.files import write_tensors

TINY_RESNET = json.dumps({"num_classes": 3, "in_chans": 1, "channels": [8, 16, 32, 64]})


def test_points_prints_a_table_of_the_models_points(capsys):
    assert main(["points", "resnet18", "--kwargs", TINY_RESNET]) == 0
    out = capsys.readouterr().out
    header, *rows = out.strip().splitlines()
    assert header.split() == ["#", "name", "shape", "layout", "reduction", "width"]
    names = [row.split()[1] for row in rows]
    assert "layer2" in names and "layer4" in names
    assert not any(".conv" in name for name in names), "sub-block modules are never points"


def test_points_json_is_machine_readable(capsys):
    assert main(["points", "resnet18", "--kwargs", TINY_RESNET, "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert [p["index"] for p in points] == list(range(len(points)))
    assert {"name", "shape", "layout", "reduction", "width"} <= set(points[0])


def test_a_model_that_is_neither_timm_nor_a_folder_is_a_clear_error(capsys):
    assert main(["points", "no-such-model"]) == 2
    assert "neither a timm model name nor a folder" in capsys.readouterr().err


def _image_folder(root: Path, classes: dict[str, int], per_class: int = 12) -> Path:
    generator = torch.Generator().manual_seed(0)
    for name, pattern in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.rand(16, 16, generator=generator) * 60
            pixels[pattern * 4 : pattern * 4 + 6] += 180  # each class has its own bright band
            Image.fromarray(pixels.clamp(0, 255).byte().numpy()).save(root / name / f"{i}.png")
    return root


def test_clone_from_image_folders_writes_a_patch(tmp_path, capsys):
    kwargs = {"num_classes": 3, "in_chans": 1, "channels": [8, 16, 32, 64]}
    for role in ("source", "target"):
        model = create_model("resnet18", **kwargs)
        write_tensors(tmp_path / f"{role}.safetensors", model.state_dict())
    data = _image_folder(tmp_path / "data", {"1": 1, "2": 2})
    replay = _image_folder(tmp_path / "replay", {"any": 0})
    config = json.dumps({"max_cuts": 1, "max_insertions": 1, "train_steps": 10})
    argv = [
        "clone",
        "--source",
        "resnet18",
        "--target",
        "resnet18",
        "--source-kwargs",
        json.dumps(kwargs),
        "--target-kwargs",
        json.dumps(kwargs),
        "--source-checkpoint",
        str(tmp_path / "source.safetensors"),
        "--target-checkpoint",
        str(tmp_path / "target.safetensors"),
        "--data",
        str(data),
        "--replay",
        str(replay),
        "--out",
        str(tmp_path / "patch"),
        "--config",
        config,
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "saved to" in capsys.readouterr().out
    saved = json.loads((tmp_path / "patch" / "patch_config.json").read_text())
    assert saved["classes"]["ids"] == [1, 2]


def test_clone_with_a_folder_that_is_not_a_class_is_a_clear_error(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", {"cats": 1})
    argv = [
        "clone",
        "--source",
        "resnet18",
        "--target",
        "resnet18",
        "--source-kwargs",
        TINY_RESNET,
        "--target-kwargs",
        TINY_RESNET,
        "--data",
        str(data),
        "--out",
        str(tmp_path / "patch"),
        "--no-progress",
    ]
    assert main(argv) == 2
    assert "'cats'" in capsys.readouterr().err


def test_demo_tells_the_whole_story(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    values = dict(line.split(None, 1) for line in out.strip().splitlines()[1:])
    assert int(values["target_params_changed"]) == 0
    assert float(values["detach_max_abs_diff"]) == 0.0
    assert float(values["acc_old"]) > 0.9 and float(values["locality"]) >= 0.97
    assert float(values["acc_new"]) > 0.6
    assert (tmp_path / "demo" / "patch_model.safetensors").is_file()
