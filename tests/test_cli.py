"""Specification of the ``pnc-surgery`` command line (points, clone, demo; push/info live in test_hub.py).

Every user error is one line on stderr, with the exit code of its kind (``pnc-surgery --help`` lists them): 2 for a
wrong argument or input, 3 for a file or model that cannot be used, 4 for the Hub or the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import pnc_surgery.cli.clone as cli_clone
from pnc_surgery.backends.timm import create_model
from pnc_surgery.cli import main

TINY = {"num_classes": 3, "in_chans": 1, "channels": [8, 16, 32, 64]}
TINY_RESNET = json.dumps(TINY)
USAGE, UNUSABLE, NETWORK = 2, 3, 4


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command writes to stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, f"an error is one line on stderr, got {lines}"
    return lines[0]


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


def test_points_explain_says_why_each_candidate_is_or_is_not_a_point(capsys):
    assert main(["points", "resnet18", "--kwargs", TINY_RESNET, "--explain"]) == 0
    out = capsys.readouterr().out
    assert "layer2: point" in out
    assert "not a point:" in out, "the rejected candidates are listed with their reason"


def test_a_model_that_is_neither_timm_nor_a_folder_is_a_clear_error(capsys):
    assert main(["points", "no-such-model"]) == USAGE
    assert "neither a timm model name, a Hub id (namespace/name) nor a folder" in error_line(capsys)


def _image_folder(root: Path, classes: dict[str, int], per_class: int = 12) -> Path:
    generator = torch.Generator().manual_seed(0)
    for name, pattern in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.rand(16, 16, generator=generator) * 60
            pixels[pattern * 4 : pattern * 4 + 6] += 180  # each class has its own bright band
            Image.fromarray(pixels.clamp(0, 255).byte().numpy()).save(root / name / f"{i}.png")
    return root


def _clone_argv(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [
        "clone", "--source", "resnet18", "--target", "resnet18", "--source-kwargs", TINY_RESNET,
        "--target-kwargs", TINY_RESNET, "--data", str(data), "--out", str(tmp_path / "patch"), "--no-progress",
        "--config", json.dumps({"max_cuts": 1, "max_insertions": 1, "train_steps": 10}), *extra,
    ]  # fmt: skip


def test_clone_from_image_folders_writes_a_patch(tmp_path, capsys):
    kwargs = {"num_classes": 3, "in_chans": 1, "channels": [8, 16, 32, 64]}
    for role in ("source", "target"):
        model = create_model("resnet18", **kwargs)
        save_file(model.state_dict(), tmp_path / f"{role}.safetensors")
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


# ------------------------------------------------------------------------------------------------ user errors


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command builds a model: the error must be found before any model work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli_clone, "load_model", refuse)


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes" in out
    for code in ("2", "3", "4", "5"):
        assert f"\n  {code} " in out


def test_a_bad_command_line_is_one_line_and_exit_code_2(capsys):
    assert main(["clone", "--source", "resnet18"]) == USAGE
    assert "required" in error_line(capsys)


def test_unknown_kwargs_are_a_one_line_usage_error(capsys):
    assert main(["points", "resnet18", "--kwargs", json.dumps({**TINY, "no_such_kwarg": 1})]) == USAGE
    assert "no_such_kwarg" in error_line(capsys)


def test_kwargs_that_are_not_a_json_object_are_a_usage_error(capsys):
    assert main(["points", "resnet18", "--kwargs", "[1, 2]"]) == USAGE
    assert "--kwargs must be a JSON object" in error_line(capsys)


def test_a_folder_with_an_invalid_config_json_is_an_unusable_model(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"architectures": ["ViTForImageClassification"], ')
    assert main(["points", str(tmp_path / "model")]) == UNUSABLE
    assert "config.json" in error_line(capsys)


def test_an_empty_data_folder_is_a_usage_error_before_any_model_is_loaded(tmp_path, capsys, no_model_loading):
    (tmp_path / "data").mkdir()
    assert main(_clone_argv(tmp_path, tmp_path / "data")) == USAGE
    assert "no sub-folders" in error_line(capsys)


def test_a_broken_png_names_the_file(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", {"1": 1}, per_class=2)
    (data / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    assert main(_clone_argv(tmp_path, data)) == UNUSABLE
    assert "broken.png" in error_line(capsys)
    assert not (tmp_path / "patch").exists()


def test_an_unknown_config_key_is_a_usage_error_before_any_model_is_loaded(tmp_path, capsys, no_model_loading):
    data = _image_folder(tmp_path / "data", {"1": 1}, per_class=2)
    assert main([*_clone_argv(tmp_path, data), "--config", '{"train_stepz": 5}']) == USAGE
    assert "train_stepz" in error_line(capsys)


def test_budget_sets_the_clone_budget_the_patch_records(tmp_path):
    data = _image_folder(tmp_path / "data", {"1": 1, "2": 2}, per_class=4)
    assert main([*_clone_argv(tmp_path, data), "--budget", "fast"]) == 0
    saved = json.loads((tmp_path / "patch" / "patch_config.json").read_text())
    assert saved["clone_config"]["budget"] == "fast"


def test_a_budget_given_twice_and_differently_is_a_usage_error(tmp_path, capsys, no_model_loading):
    data = _image_folder(tmp_path / "data", {"1": 1}, per_class=2)
    argv = [*_clone_argv(tmp_path, data), "--budget", "fast", "--config", '{"budget": "thorough"}']
    assert main(argv) == USAGE
    assert "disagree" in error_line(capsys)


def test_a_checkpoint_that_does_not_fit_says_which_tensors(tmp_path, capsys):
    other = create_model("resnet18", num_classes=3, in_chans=1, channels=[4, 8, 16, 32])
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    data = _image_folder(tmp_path / "data", {"1": 1}, per_class=2)
    assert main([*_clone_argv(tmp_path, data), "--target-checkpoint", str(tmp_path / "other.safetensors")]) == UNUSABLE
    line = error_line(capsys)
    assert "--target-checkpoint" in line and "of another shape" in line


@pytest.mark.parametrize("existing", ["file", "folder"])
def test_an_existing_out_path_is_refused_before_any_model_is_loaded(tmp_path, capsys, no_model_loading, existing):
    data = _image_folder(tmp_path / "data", {"1": 1}, per_class=2)
    if existing == "file":
        (tmp_path / "patch").write_text("keep me")
    else:
        (tmp_path / "patch").mkdir()
    assert main(_clone_argv(tmp_path, data)) == USAGE
    assert "--out" in error_line(capsys)
    assert existing == "folder" or (tmp_path / "patch").read_text() == "keep me"


def test_demo_refuses_to_overwrite_without_overwrite(tmp_path, capsys, monkeypatch):
    import pnc_surgery.demo

    monkeypatch.setattr(pnc_surgery.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran over an old patch"))
    (tmp_path / "pnc_demo_patch").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--no-progress"]) == USAGE
    assert "--overwrite" in error_line(capsys)


def test_demo_overwrites_when_asked(tmp_path, capsys, monkeypatch):
    import pnc_surgery.demo

    ran = []
    monkeypatch.setattr(pnc_surgery.demo, "run_demo", lambda out, **k: ran.append(out) or {"acc_all": 1.0})
    (tmp_path / "old").mkdir()
    assert main(["demo", "--out", str(tmp_path / "old"), "--overwrite", "--no-progress"]) == 0
    assert ran == [tmp_path / "old"]


def test_an_unexpected_error_is_one_line_with_exit_code_1(capsys, monkeypatch):
    monkeypatch.setattr("pnc_surgery.cli.points.find_points", lambda model, **options: 1 / 0)
    assert main(["points", "resnet18", "--kwargs", TINY_RESNET]) == 1
    line = error_line(capsys)
    assert "internal error: ZeroDivisionError" in line and "--traceback" in line


@pytest.mark.parametrize("command", ["points", "info"])
def test_a_hub_that_cannot_be_reached_is_exit_code_4_in_every_command(capsys, monkeypatch, tmp_path, command):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline and nothing cached: nothing is contacted
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    assert main([command, "someone/some-repo"]) == NETWORK
    assert "someone/some-repo" in error_line(capsys)


def test_clone_from_folders_feeds_each_model_its_own_pixels_and_the_patch_works(tmp_path, capsys, monkeypatch):
    """Source and target have their own data configs: the source normalises with mean 0.5 / std 0.25 and looks at the
    central half of an image (crop 0.5), the target normalises with 0.2 / 0.1 and sees it whole. The images are a
    white square on black, so each model's stem shows which preprocessing it got: pixels prepared once for both
    (one normalisation, or the target's pixels renormalised for the source) fail this. The patch then works."""
    from pnc_surgery import Patch

    for label in ("1", "2"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            image = Image.new("RGB", (32, 32))
            image.paste((255, 255, 255), (6, 6, 26, 26))
            image.save(tmp_path / "data" / label / f"{i}.png")
    configs = {"source": (0.5, 0.25, 0.5), "target": (0.2, 0.1, 1.0)}  # mean, std, crop_pct
    models, seen = {}, {}

    def load_model_with_its_data_config(spec, **kwargs):
        """As a Hub model comes: with its own data config (32 px, mean, std, crop); its stem's inputs recorded."""
        role = "source" if not models else "target"
        torch.manual_seed(len(models))
        model = models[role] = create_model(spec, **kwargs).eval()
        mean, std, crop = configs[role]
        model.pretrained_cfg = {
            **model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": crop, "mean": (mean,) * 3, "std": (std,) * 3
        }  # fmt: skip
        seen[role] = []
        model.conv1.register_forward_pre_hook(lambda module, args: seen[role].append(args[0].detach().clone()))
        return model

    monkeypatch.setattr(cli_clone, "load_model", load_model_with_its_data_config)
    argv = _clone_argv(tmp_path, tmp_path / "data")
    argv[argv.index("--source-kwargs") + 1] = json.dumps({"num_classes": 4, "channels": [8, 8, 16, 16]})
    argv[argv.index("--target-kwargs") + 1] = json.dumps({"num_classes": 3, "channels": [8, 8, 16, 16]})
    assert main(argv) == 0, capsys.readouterr().err

    white, black = ({role: (v - mean) / std for role, (mean, std, _) in configs.items()} for v in (1.0, 0.0))
    [source_batch, *_] = [x for x in seen["source"] if x.shape[0] == 12]  # the whole clone set in one batch
    [target_batch, *_] = [x for x in seen["target"] if x.shape[0] == 12]
    assert source_batch.shape[1:] == target_batch.shape[1:] == (3, 32, 32)
    torch.testing.assert_close(source_batch, torch.full_like(source_batch, white["source"]), atol=0.05, rtol=0)
    torch.testing.assert_close(target_batch.amax(), torch.tensor(white["target"]), atol=0.05, rtol=0)
    torch.testing.assert_close(target_batch.amin(), torch.tensor(black["target"]), atol=0.05, rtol=0)

    target, x = models["target"], target_batch[:2]
    patch = Patch.from_pretrained(tmp_path / "patch")
    with torch.no_grad():
        plain = target(x)
        with patch.attached(target):
            patched = target(x)
        assert torch.equal(target(x), plain)
    assert patched.shape == (2, 3 + 2) and torch.equal(patched[:, :3], plain)


def test_a_transformers_target_saved_without_a_processor_takes_one_from_target_processor(tmp_path, capsys):
    """A folder with a model but no image processor cannot preprocess images by itself: the command says which
    option gives it one, and with ``--target-processor`` the clone runs on that processor's pixels."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "processor")
    data = _image_folder(tmp_path / "data", {"1": 1, "2": 2}, per_class=6)
    argv = _clone_argv(tmp_path, data)
    argv[argv.index("--target") + 1] = str(tmp_path / "vit")
    del argv[argv.index("--target-kwargs") : argv.index("--target-kwargs") + 2]
    del argv[argv.index("--source-kwargs") : argv.index("--source-kwargs") + 2]

    assert main([*argv, "--source-kwargs", json.dumps({"num_classes": 3, "channels": [8, 8, 16, 16]})]) == USAGE
    assert "--target-processor" in capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress
    argv += ["--source-kwargs", json.dumps({"num_classes": 3, "channels": [8, 8, 16, 16]})]
    assert main([*argv, "--target-processor", str(tmp_path / "processor")]) == 0, capsys.readouterr().err
    assert (tmp_path / "patch" / "patch_model.safetensors").is_file()
