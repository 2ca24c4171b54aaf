"""Sharing patches: push to and load from a Hub, safety of what is loaded, the model card, and the hub CLI.

Every Hub test runs the real ``huggingface_hub`` client against :class:`fake_hub.FakeHub`, a small Hub served
on 127.0.0.1; every other test runs with ``HF_HUB_OFFLINE`` set, so nothing here can reach the network.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub, go_offline
from huggingface_hub import ModelCard, constants

from pnc_surgery.errors import InvalidInputError, PatchFormatError
from pnc_surgery.hub import (
    CARD_TAGS,
    card_for_folder,
    push_folder,
    resolve_patch_folder,
)
from pnc_surgery.patch import FORMAT_VERSION, PatchConfig
from pnc_surgery.patch.serialization import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_config,
    read_tensors,
    tensor_bytes,
    write_folder,
)

SNIPPET = (
    "import pnc_surgery\n"
    'patch = pnc_surgery.Patch.from_pretrained("{where}")\n'
    "patch.attach(target_model)   # target_model(x) now scores the target's classes followed by the cloned ones\n"
)


FIXTURE = Path(__file__).parent / "data" / "format_v1_resnet" / CONFIG_NAME


def make_config(
    source_id: str = "timm/resnet18",
    target_id: str = "google/vit-base-patch16-224",
    names: tuple[str, ...] = ("cat", "dog"),
    metrics: dict | None = None,
) -> PatchConfig:
    """A valid patch config (the format-1 fixture's) with the fields the card and ``info`` read set for the test."""
    data = json.loads(FIXTURE.read_text())
    data["source"]["id"], data["target"]["id"], data["target"]["num_classes"] = source_id, target_id, 1000
    data["insertion"]["name"] = "vit.encoder.layer.5"
    data["classes"]["names"] = list(names)
    data["metrics"] = (
        {"clone_accuracy": 0.9375, "target_agreement": 1.0, "calibration": "logit"} if metrics is None else metrics
    )
    data["versions"] = {"pnc_surgery": "0.1.0"}
    return PatchConfig.from_dict(PatchConfig.from_dict(data).to_dict())  # as written now: the current format


TENSORS = {"adapter.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "gate.bias": torch.zeros(2)}


def make_patch(folder: Path, config: PatchConfig | None = None) -> Path:
    """Write a patch folder as ``Patch.save_pretrained`` does (its tensors are stand-ins: nothing here builds it)."""
    config = config or make_config()
    card = card_for_folder(folder, config)
    write_folder(
        folder,
        {
            WEIGHTS_NAME: tensor_bytes(TENSORS, {"format": "pt"}),
            CONFIG_NAME: json.dumps(config.to_dict(), indent=2).encode(),
            CARD_NAME: card.encode(),
        },
    )
    return folder


def huge_header_file() -> bytes:
    """A "safetensors" file whose header claims a terabyte: reading it must fail before allocating."""
    return struct.pack("<Q", 2**40) + b'{"__metadata__": {}}'


@pytest.fixture(autouse=True)
def offline_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach huggingface.co."""
    go_offline(monkeypatch, tmp_path)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """A fake Hub the client talks to as if it were ``HF_ENDPOINT``."""
    with FakeHub() as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def patch_dir(tmp_path: Path) -> Path:
    return make_patch(tmp_path / "patch")


def commits(server: FakeHub) -> list[str]:
    return [path for method, path in server.requests if method == "POST" and "/commit/" in path]


# --------------------------------------------------------------------------------------------- round trip


def test_push_then_download_gives_back_the_same_files(hub: FakeHub, patch_dir: Path, tmp_path: Path) -> None:
    url = push_folder(patch_dir, "alice/cats", token="hf_write")
    assert url.startswith(f"{hub.endpoint}/alice/cats/commit/")

    folder = resolve_patch_folder("alice/cats", cache_dir=tmp_path / "cache")
    assert folder.is_relative_to(tmp_path / "cache")
    assert (folder / CONFIG_NAME).read_bytes() == (patch_dir / CONFIG_NAME).read_bytes()
    assert (folder / WEIGHTS_NAME).read_bytes() == (patch_dir / WEIGHTS_NAME).read_bytes()
    assert read_config(folder / CONFIG_NAME) == make_config()
    tensors, _ = read_tensors(folder / WEIGHTS_NAME)
    assert all(torch.equal(tensors[name], TENSORS[name]) for name in TENSORS)
    assert (folder / CARD_NAME).is_file()


def test_push_uploads_only_the_patch_files_in_one_commit(hub: FakeHub, patch_dir: Path) -> None:
    (patch_dir / "optimizer.pt").write_bytes(b"not for the hub")
    (patch_dir / "notes.txt").write_text("private notes")

    push_folder(patch_dir, "alice/cats", commit_message="first patch")

    assert len(commits(hub)) == 1
    assert sorted(hub.files("alice/cats")) == [".gitattributes", CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    repo = hub.repos["alice/cats"]
    assert repo.messages[repo.refs["main"]] == "first patch"


def test_push_creates_a_private_repo_when_asked(hub: FakeHub, patch_dir: Path) -> None:
    push_folder(patch_dir, "alice/secret", private=True)
    assert hub.repos["alice/secret"].private is True


def test_push_to_an_existing_repo_adds_a_commit(hub: FakeHub, patch_dir: Path, tmp_path: Path) -> None:
    push_folder(patch_dir, "alice/cats")
    other = make_patch(tmp_path / "v2", make_config(metrics={"clone_accuracy": 0.5}))
    push_folder(other, "alice/cats")

    assert len(commits(hub)) == 2
    assert read_config(resolve_patch_folder("alice/cats") / CONFIG_NAME).metrics == {"clone_accuracy": 0.5}


def test_push_with_create_pr_opens_a_pull_request_and_leaves_main_alone(hub: FakeHub, patch_dir: Path) -> None:
    hub.add_repo("alice/cats", {})
    url = push_folder(patch_dir, "alice/cats", create_pr=True)

    assert url == f"{hub.endpoint}/alice/cats/discussions/1"
    assert CONFIG_NAME not in hub.files("alice/cats", "main")
    folder = resolve_patch_folder("alice/cats", revision="refs/pr/1")
    assert read_config(folder / CONFIG_NAME) == make_config()


def test_push_to_a_new_branch_creates_it_and_leaves_main_alone(hub: FakeHub, patch_dir: Path) -> None:
    push_folder(patch_dir, "alice/cats", revision="experiment")

    assert CONFIG_NAME not in hub.files("alice/cats", "main")
    assert read_config(resolve_patch_folder("alice/cats", revision="experiment") / CONFIG_NAME) == make_config()
    push_folder(patch_dir, "alice/cats", revision="experiment", commit_message="again")  # the branch exists now


def test_download_pins_every_file_to_one_commit(hub: FakeHub, patch_dir: Path) -> None:
    push_folder(patch_dir, "alice/cats")
    commit = hub.repos["alice/cats"].refs["main"]
    before = len(hub.requests)

    folder = resolve_patch_folder("alice/cats")

    assert folder.name == commit
    downloads = {path for _, path in hub.requests[before:] if "/resolve/" in path}
    assert downloads == {f"/alice/cats/resolve/{commit}/{name}" for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)}


def test_subfolder_of_a_hub_repo(hub: FakeHub, patch_dir: Path) -> None:
    hub.add_repo(
        "alice/many", {f"cats/{name}": (patch_dir / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    )
    folder = resolve_patch_folder("alice/many", subfolder="cats")
    assert folder.name == "cats" and read_config(folder / CONFIG_NAME) == make_config()


def tiny_resnet(seed: int, num_classes: int) -> torch.nn.Module:
    from pnc_surgery.backends.timm import create_model

    torch.manual_seed(seed)
    kwargs = {"num_classes": num_classes, "channels": (8, 16, 32, 64), "stem_width": 8, "zero_init_last": False}
    return create_model("resnet18", **kwargs).eval()


def test_a_real_patch_goes_to_the_hub_and_comes_back_working(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pnc_surgery.patch import Patch

    source, target = tiny_resnet(0, num_classes=6), tiny_resnet(1, num_classes=5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    patch = Patch.assemble(source, target, "layer3", "layer2", classes=[1, 4], source_input=x, target_input=x)
    with torch.no_grad():
        plain = target(x)
        with patch.attached(target):
            expected = target(x)

    url = patch.push_to_hub("alice/resnet-patch", private=True)

    assert url.startswith(f"{hub.endpoint}/alice/resnet-patch/commit/") and len(commits(hub)) == 1
    card = ModelCard(hub.files("alice/resnet-patch")[CARD_NAME].decode())
    assert SNIPPET.format(where="alice/resnet-patch") in card.text
    loaded = Patch.from_pretrained("alice/resnet-patch", cache_dir=tmp_path / "cache")
    with torch.no_grad(), loaded.attached(target):
        out = target(x)
    assert out.shape == (2, 5 + 2)
    assert torch.equal(out[:, :5], plain)
    torch.testing.assert_close(out, expected)

    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = Patch.from_pretrained("alice/resnet-patch", cache_dir=tmp_path / "cache")
    with torch.no_grad(), again.attached(target):
        torch.testing.assert_close(target(x), expected)
    assert torch.equal(target(x), plain)


def test_the_mixins_generate_model_card_is_the_card_a_save_writes(tmp_path: Path) -> None:
    from pnc_surgery.patch import Patch

    source, target = tiny_resnet(0, num_classes=6), tiny_resnet(1, num_classes=5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    patch = Patch.assemble(source, target, "layer3", "layer2", classes=[1, 4], source_input=x, target_input=x)
    folder = patch.save_pretrained(tmp_path / "p")
    assert str(patch.generate_model_card(folder.as_posix())) == (folder / CARD_NAME).read_text()


# --------------------------------------------------------------------------------------------- offline and cache


def test_offline_download_uses_cache(hub: FakeHub, patch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    push_folder(patch_dir, "alice/cats")
    online = resolve_patch_folder("alice/cats")
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    offline = resolve_patch_folder("alice/cats")

    assert offline == online
    assert read_config(offline / CONFIG_NAME) == make_config()


def test_local_files_only_uses_cache_without_asking_the_hub(hub: FakeHub, patch_dir: Path) -> None:
    push_folder(patch_dir, "alice/cats")
    online = resolve_patch_folder("alice/cats")
    asked = len(hub.requests)

    assert resolve_patch_folder("alice/cats", local_files_only=True) == online
    assert len(hub.requests) == asked


def test_offline_without_cache_says_so() -> None:
    with pytest.raises(
        PatchFormatError,
        match=r"alice/never-downloaded: not a local folder, and not loadable from the Hub .*HF_HUB_OFFLINE",
    ):
        resolve_patch_folder("alice/never-downloaded")


def test_local_files_only_without_cache_says_so(hub: FakeHub) -> None:
    with pytest.raises(PatchFormatError, match="local_files_only=False"):  # what huggingface_hub says to do
        resolve_patch_folder("alice/never-downloaded", local_files_only=True)
    assert hub.requests == []


def test_force_download_cannot_work_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the autouse fixture does too; said here for the reader
    with pytest.raises(InvalidInputError, match="force_download"):
        resolve_patch_folder("alice/cats", force_download=True)  # offline: HF_HUB_OFFLINE is set above


# --------------------------------------------------------------------------------------------- clear errors


def test_missing_repo_is_a_clear_error(hub: FakeHub) -> None:
    with pytest.raises(PatchFormatError, match="not a local folder, and not loadable from the Hub") as caught:
        resolve_patch_folder("alice/missing")
    assert "Repository Not Found" in str(caught.value)  # huggingface_hub's own explanation follows


def test_missing_revision_is_a_clear_error(hub: FakeHub, patch_dir: Path) -> None:
    push_folder(patch_dir, "alice/cats")
    with pytest.raises(PatchFormatError, match="Revision Not Found"):
        resolve_patch_folder("alice/cats", revision="v9")


def test_repo_without_a_patch_config_lists_what_it_holds(hub: FakeHub) -> None:
    hub.add_repo("bob/vit", {"config.json": b"{}", "model.safetensors": b""})
    with pytest.raises(
        PatchFormatError, match=r"no patch_config\.json \(it holds: .*config\.json.*is this a pnc_surgery patch"
    ):
        resolve_patch_folder("bob/vit")


def test_repo_with_config_but_no_weights_is_a_clear_error(hub: FakeHub, patch_dir: Path) -> None:
    hub.add_repo("bob/half", {CONFIG_NAME: (patch_dir / CONFIG_NAME).read_bytes()})
    with pytest.raises(PatchFormatError, match=f"no {WEIGHTS_NAME}"):
        resolve_patch_folder("bob/half")


def test_a_path_that_is_neither_a_folder_nor_a_repo_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PatchFormatError, match="no such folder"):
        resolve_patch_folder(tmp_path / "missing")
    with pytest.raises(PatchFormatError, match="no such folder"):
        resolve_patch_folder("not/a/repo")
    with pytest.raises(PatchFormatError, match="is a file"):
        resolve_patch_folder(make_patch(tmp_path / "p") / CONFIG_NAME)


def test_arguments_of_the_wrong_kind_are_refused_before_any_request(hub: FakeHub, patch_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="expected a folder or a Hub repo id, got int"):
        resolve_patch_folder(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="subfolder must be a string"):
        resolve_patch_folder("alice/cats", subfolder=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="repo_id must look like 'namespace/name'"):
        push_folder(patch_dir, "not a repo id")
    assert hub.requests == []


# --------------------------------------------------------------------------------------------- safety


def test_repo_with_only_pickle_weights_is_refused(hub: FakeHub) -> None:
    hub.add_repo("mallory/ckpt", {"pytorch_model.bin": b"\x80\x04 pickle", "config.json": b"{}"})
    with pytest.raises(PatchFormatError, match=r"no patch_config\.json \(it holds: .*pytorch_model\.bin\).*pickle"):
        resolve_patch_folder("mallory/ckpt")
    assert not any("pytorch_model.bin" in path for _, path in hub.requests)


def test_local_folder_with_only_pickle_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(PatchFormatError, match=r"no patch_config\.json \(it holds: model\.ckpt\).*pickle"):
        resolve_patch_folder(tmp_path)


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
def test_symlink_out_of_a_local_folder_is_refused(patch_dir: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes((patch_dir / name).read_bytes())
    (patch_dir / name).unlink()
    (patch_dir / name).symlink_to(outside)
    with pytest.raises(PatchFormatError, match="outside the patch folder"):
        resolve_patch_folder(patch_dir)


def test_symlink_inside_a_local_folder_is_fine(patch_dir: Path) -> None:
    (patch_dir / "v1").mkdir()
    (patch_dir / WEIGHTS_NAME).rename(patch_dir / "v1" / WEIGHTS_NAME)
    (patch_dir / WEIGHTS_NAME).symlink_to(Path("v1") / WEIGHTS_NAME)
    assert resolve_patch_folder(patch_dir) == patch_dir


def test_subfolder_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    make_patch(tmp_path / "elsewhere")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PatchFormatError, match="outside"):
        resolve_patch_folder(tmp_path / "root", subfolder="sub")


def test_hub_cache_snapshot_is_accepted_as_a_local_folder(hub: FakeHub, patch_dir: Path) -> None:
    """A snapshot folder links its files into the cache's blobs/: that is where they belong."""
    push_folder(patch_dir, "alice/cats")
    snapshot = resolve_patch_folder("alice/cats")
    assert (snapshot / WEIGHTS_NAME).is_symlink()
    assert resolve_patch_folder(str(snapshot)) == snapshot


@pytest.mark.parametrize("subfolder", ["..", "../other", "a/../..", "/etc", "a/../../b", "..\\x", "C:\\Windows"])
def test_subfolder_escaping_the_repo_is_refused(hub: FakeHub, patch_dir: Path, subfolder: str) -> None:
    with pytest.raises(InvalidInputError, match="subfolder"):
        resolve_patch_folder("alice/cats", subfolder=subfolder)
    with pytest.raises(InvalidInputError, match="subfolder"):
        resolve_patch_folder(patch_dir, subfolder=subfolder)
    assert hub.requests == []


def test_huge_safetensors_header_is_refused_after_download(hub: FakeHub, patch_dir: Path) -> None:
    hub.add_repo(
        "mallory/huge", {CONFIG_NAME: (patch_dir / CONFIG_NAME).read_bytes(), WEIGHTS_NAME: huge_header_file()}
    )
    folder = resolve_patch_folder("mallory/huge")
    with pytest.raises(PatchFormatError, match="header claims"):
        read_tensors(folder / WEIGHTS_NAME)


def test_push_refuses_a_file_linked_from_outside_the_folder(hub: FakeHub, patch_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("secret")
    (patch_dir / WEIGHTS_NAME).unlink()
    (patch_dir / WEIGHTS_NAME).symlink_to(secret)
    with pytest.raises(PatchFormatError, match="outside the patch folder"):
        push_folder(patch_dir, "alice/cats")
    assert hub.requests == []


# --------------------------------------------------------------------------------------------- model card


def test_card_has_metadata_classes_points_metrics_and_snippet(patch_dir: Path) -> None:
    card = ModelCard.load(patch_dir / CARD_NAME)

    assert card.data.library_name == "pnc_surgery"
    assert card.data.base_model == ["google/vit-base-patch16-224", "timm/resnet18"]
    assert set(CARD_TAGS) <= set(card.data.tags)
    assert "| 1000 | 1 | cat |" in card.text and "| 1001 | 3 | dog |" in card.text
    assert "`layer3`" in card.text and "`vit.encoder.layer.5`" in card.text
    assert "| clone_accuracy | 0.9375 |" in card.text and "| calibration | logit |" in card.text
    assert SNIPPET.format(where=patch_dir.as_posix()) in card.text


def test_card_base_model_lists_only_hub_ids(tmp_path: Path) -> None:
    folder = make_patch(tmp_path / "p", make_config(source_id="MyResNet", target_id="/home/me/model.pt"))
    card = ModelCard.load(folder / CARD_NAME)
    assert card.data.base_model is None
    assert card.data.library_name == "pnc_surgery"


def test_card_table_cells_cannot_break_the_table(tmp_path: Path) -> None:
    folder = make_patch(tmp_path / "p", make_config(names=("a|b\nc", "dog")))
    assert "| 1000 | 1 | a\\|b c |" in (folder / CARD_NAME).read_text()


def test_existing_card_is_updated_not_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / CARD_NAME).write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# Our cat patch\n\nHand-written notes.\n")

    make_patch(folder)

    card = ModelCard.load(folder / CARD_NAME)
    assert card.text == "\n# Our cat patch\n\nHand-written notes.\n"
    assert card.data.license == "mit"
    assert card.data.tags == ["mine", *CARD_TAGS]
    assert card.data.library_name == "pnc_surgery"
    assert card.data.base_model == ["google/vit-base-patch16-224", "timm/resnet18"]


def test_saving_again_refreshes_the_generated_part_and_keeps_notes_around_it(patch_dir: Path) -> None:
    card_path = patch_dir / CARD_NAME
    card_path.write_text(
        "Intro by a person.\n\n" + card_path.read_text().split("---\n", 2)[2] + "\n## Notes\nKeep me.\n"
    )

    card_path.write_text(card_for_folder(patch_dir, make_config(metrics={"clone_accuracy": 0.5})))

    text = card_path.read_text()
    assert "Intro by a person." in text and "## Notes\nKeep me." in text
    assert "| clone_accuracy | 0.5 |" in text and "0.9375" not in text
    assert text.count("pnc_surgery:start") == 1
    assert ModelCard.load(card_path).data.library_name == "pnc_surgery"


def test_card_with_broken_metadata_is_an_error_not_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / CARD_NAME).write_text("---\n[unbalanced\n---\nprecious text\n")
    with pytest.raises(PatchFormatError, match="model card"):
        card_for_folder(folder, make_config())
    assert "precious text" in (folder / CARD_NAME).read_text()


def test_pushed_card_snippet_names_the_repo(hub: FakeHub, patch_dir: Path) -> None:
    push_folder(patch_dir, "alice/cats")
    card = ModelCard(hub.files("alice/cats")[CARD_NAME].decode())
    assert SNIPPET.format(where="alice/cats") in card.text
    assert card.data.library_name == "pnc_surgery"


def test_push_merges_with_the_card_already_on_the_hub(hub: FakeHub, patch_dir: Path) -> None:
    hub.add_repo("alice/cats", {CARD_NAME: b"---\nlicense: apache-2.0\n---\n# Team card\n\nWritten on the Hub.\n"})

    push_folder(patch_dir, "alice/cats")

    card = ModelCard(hub.files("alice/cats")[CARD_NAME].decode())
    assert card.text == "# Team card\n\nWritten on the Hub.\n"
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "pnc_surgery"
    assert card.data.base_model == ["google/vit-base-patch16-224", "timm/resnet18"]


# --------------------------------------------------------------------------------------------- CLI


def run_cli(*argv: str) -> int:
    from pnc_surgery.cli import main

    return main(list(argv))


def test_cli_info_describes_a_local_patch(patch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("info", str(patch_dir)) == 0
    out = capsys.readouterr().out
    for expected in (
        f"version {FORMAT_VERSION}",
        "timm/resnet18",
        "layer3",
        "google/vit-base-patch16-224",
        "vit.encoder.layer.5",
        "cat",
        "dog",
        "14 values (parameters and buffers), 56 bytes",
        WEIGHTS_NAME,
        "clone_accuracy",
    ):
        assert expected in out


def test_cli_info_json_reports_sizes_from_the_header(patch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("info", str(patch_dir), "--json") == 0
    info = json.loads(capsys.readouterr().out)

    assert info["format_version"] == FORMAT_VERSION
    assert (info["source"], info["target"]) == ("timm/resnet18", "google/vit-base-patch16-224")
    assert (info["cut"], info["insertion"]) == ("layer3", "vit.encoder.layer.5")
    assert info["classes"] == [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    assert info["tensors"]["adapter.weight"] == {"dtype": "F32", "shape": [3, 4], "numel": 12, "bytes": 48}
    assert info["num_values"] == 14 and info["tensor_bytes"] == 56
    assert info["file_bytes"][WEIGHTS_NAME] == os.path.getsize(patch_dir / WEIGHTS_NAME)
    assert info["metrics"]["clone_accuracy"] == 0.9375


def test_cli_info_reads_a_hub_repo(hub: FakeHub, patch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    push_folder(patch_dir, "alice/cats")
    assert run_cli("info", "alice/cats", "--revision", "main", "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_values"] == 14


def test_cli_info_refuses_a_huge_header(patch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (patch_dir / WEIGHTS_NAME).write_bytes(huge_header_file())
    assert run_cli("info", str(patch_dir)) == 3  # a file that cannot be used (pnc-surgery --help)
    assert "not a valid safetensors file" in capsys.readouterr().err


def test_cli_push_prints_the_url(hub: FakeHub, patch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("push", str(patch_dir), "alice/cats", "--private", "--message", "from the CLI") == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub.endpoint}/alice/cats/commit/")
    repo = hub.repos["alice/cats"]
    assert repo.private is True and repo.messages[repo.refs["main"]] == "from the CLI"


def test_cli_push_of_a_folder_without_a_patch_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("push", str(tmp_path), "alice/cats") == 3  # a file that cannot be used
    assert "no patch_config.json" in capsys.readouterr().err
