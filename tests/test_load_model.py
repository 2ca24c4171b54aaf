"""Specification of ``pnc_surgery.load_model`` and the CLI's model specs: timm names, Hub ids, local folders.

Hub ids are served from a hand-made huggingface_hub cache with ``HF_HUB_OFFLINE`` set: a timm repo written with
timm's own ``save_for_hf`` and a transformers repo written with ``save_pretrained``, each in a cache snapshot as
``hf_hub_download`` lays them out. Nothing can reach the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image

import pnc_surgery
from pnc_surgery import InvalidInputError, UnsupportedModelError, load_model
from pnc_surgery.backends import backend_for
from pnc_surgery.cli import main

TIMM_REPO, HF_REPO = "timm/resnet18.tiny_test", "someone/tiny-vit"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` at ``COMMIT`` in a huggingface_hub cache, with ``main`` pointing at it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    folder = root / "snapshots" / COMMIT
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory) -> dict:
    """A huggingface_hub cache holding a tiny timm model and a tiny transformers ViT, with their weights."""
    import timm
    from timm.models import save_for_hf
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cache = tmp_path_factory.mktemp("hf_cache")
    torch.manual_seed(0)
    cnn = timm.create_model("resnet18", num_classes=4, channels=(8, 16, 32, 64))
    save_for_hf(cnn, str(_snapshot(cache, TIMM_REPO)), safe_serialization=True)
    vit = ViTForImageClassification(
        ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=3)
    )  # fmt: skip
    folder = _snapshot(cache, HF_REPO)
    vit.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)  # as a Hub ViT repo has it
    return {"cache": cache, "timm": cnn.state_dict(), "transformers": vit.state_dict()}


@pytest.fixture(autouse=True)
def offline_cache(hub_models, monkeypatch):
    """Every test here runs offline, on the hand-made cache."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_models["cache"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_models["cache"]))


def _same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("spec", [TIMM_REPO, f"hf-hub:{TIMM_REPO}", f"{TIMM_REPO}@main"])
def test_a_timm_hub_id_loads_its_pretrained_weights_from_the_cache(hub_models, spec):
    model = load_model(spec)
    assert _same_weights(model, hub_models["timm"])
    assert not model.training
    assert backend_for(model).identity(model) == TIMM_REPO


def test_a_transformers_hub_id_loads_its_pretrained_weights_from_the_cache(hub_models):
    model = load_model(HF_REPO)
    assert type(model).__name__ == "ViTForImageClassification"
    assert _same_weights(model, hub_models["transformers"])
    assert backend_for(model).identity(model) == HF_REPO


@pytest.mark.parametrize("repo, family", [(TIMM_REPO, "timm"), (HF_REPO, "transformers")])
def test_pretrained_false_builds_the_architecture_with_fresh_weights(hub_models, repo, family):
    model = load_model(repo, pretrained=False)
    assert model.state_dict().keys() == hub_models[family].keys()
    assert not _same_weights(model, hub_models[family])


def test_load_model_is_public_and_cache_dir_works(hub_models, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert pnc_surgery.load_model is load_model
    model = load_model(HF_REPO, cache_dir=hub_models["cache"], local_files_only=True)
    assert _same_weights(model, hub_models["transformers"])


def test_a_repo_that_is_not_cached_offline_says_which(tmp_path):
    with pytest.raises(LocalEntryNotFoundError, match=r"someone/not-cached: config\.json is not in the Hub cache"):
        load_model("someone/not-cached")


def test_kwargs_reach_the_model_and_unknown_ones_are_refused(hub_models):
    assert load_model(HF_REPO, pretrained=False, num_labels=7).config.num_labels == 7
    assert load_model("resnet18", num_classes=2, in_chans=1).num_classes == 2
    with pytest.raises(InvalidInputError, match="no_such_field"):
        load_model(HF_REPO, no_such_field=1)
    with pytest.raises(InvalidInputError, match="no_such_kwarg"):
        load_model("resnet18", no_such_kwarg=1)


def test_a_folder_with_pickle_weights_only_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ViTForImageClassification"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsupportedModelError, match="pickle"):
        load_model(str(tmp_path))


def test_a_cache_snapshot_folder_loads_like_its_hub_id(hub_models):
    folder = next((hub_models["cache"] / f"models--{TIMM_REPO.replace('/', '--')}" / "snapshots").iterdir())
    assert _same_weights(load_model(str(folder)), hub_models["timm"])


def test_the_cli_clones_between_hub_ids_offline(hub_models, tmp_path, capsys):
    """``pnc-surgery clone --source timm/... --target org/name``: pretrained weights from the cache by default."""
    generator = torch.Generator().manual_seed(0)
    for name in ("1", "2"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            pixels = torch.rand(32, 32, 3, generator=generator) * 80
            pixels[:, int(name) * 10 : int(name) * 10 + 8] += 170
            Image.fromarray(pixels.clamp(0, 255).byte().numpy()).save(tmp_path / "data" / name / f"{i}.png")
    config = json.dumps({"max_cuts": 1, "max_insertions": 1, "search_steps": 2, "train_steps": 5})
    argv = ["clone", "--source", TIMM_REPO, "--target", HF_REPO, "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "patch"), "--config", config, "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "patch" / "patch_config.json").read_text())
    assert TIMM_REPO in json.dumps(saved) and HF_REPO in json.dumps(saved)
