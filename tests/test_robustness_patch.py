"""Regression tests for the hardening of attach, copies, files and the Hub (issue 14): one test per defect, named
after it, each failing on the code before the fix.

Models are the tiny ones of ``test_patch.py``; Hub tests talk to :class:`fake_hub.FakeHub` or to a loopback socket
that accepts connections and never answers; memory tests run in a subprocess under ``resource.setrlimit``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub, go_offline
from huggingface_hub import constants
from safetensors import safe_open
from test_patch import fresh_patch, images, make_case, timm_resnet

from pnc_surgery import Patch
from pnc_surgery.errors import (
    HubTimeoutError,
    InvalidInputError,
    PatchFormatError,
    PatchMismatchError,
    PatchStateError,
)
from pnc_surgery.hub import push_folder
from pnc_surgery.patch import serialization
from pnc_surgery.patch.serialization import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach huggingface.co."""
    go_offline(monkeypatch, tmp_path)


def attached_copy(name: str = "timm_cnn") -> tuple[torch.nn.Module, Patch]:
    """A private target and patch of a ``test_patch`` case, attached."""
    case = make_case(name)
    target, patch = copy.deepcopy(case.target), fresh_patch(case)
    patch.attach(target)
    return target, patch


# ---------------------------------------------------------------------------------------------- 1. threads


def test_concurrent_forwards_of_one_patched_target_equal_sequential_ones() -> None:
    target, patch = attached_copy()
    inputs = [images(1 + i % 3, seed=100 + i) for i in range(16)]
    with torch.no_grad():
        expected = [target(x) for x in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        start.wait()
        try:
            for m in range(12):
                i = (t * 5 + m) % len(inputs)
                with torch.no_grad():
                    results[(t, m)] = target(inputs[i])
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    patch.detach()
    assert errors == []
    wrong = [k for k, out in results.items() if not torch.equal(out, expected[(k[0] * 5 + k[1]) % len(inputs)])]
    assert len(results) == 8 * 12 and wrong == []


# ---------------------------------------------------------------------------------------------- 2. non-finite


def test_save_and_load_refuse_non_finite_tensors_and_attach_refuses_a_non_finite_patch(tmp_path: Path) -> None:
    case = make_case("timm_cnn")
    patch = fresh_patch(case)
    tensors = patch.tensors()
    with torch.no_grad():
        patch.adapter.proj.weight[0, 0] = float("nan")
    with pytest.raises(PatchStateError, match="non-finite"):
        patch.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan" / CONFIG_NAME).exists()
    with pytest.raises(PatchStateError, match="non-finite"):
        patch.attach(copy.deepcopy(case.target))
    tensors["gate.bias"] = torch.full_like(tensors["gate.bias"], float("inf"))
    from safetensors.torch import save_file

    path = tmp_path / "inf.safetensors"
    save_file(tensors, path, {"format": "pt", serialization.METADATA_KEY: json.dumps(case.patch.config.to_dict())})
    with pytest.raises(PatchFormatError, match="non-finite"):
        Patch.load(path)


# ---------------------------------------------------------------------------------------------- 3. allocation

_HOSTILE_LOAD = r"""
import json, resource, sys
import torch
from pnc_surgery import Patch
from pnc_surgery.errors import PatchFormatError
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 768 * 2**20, resource.RLIM_INFINITY))
results = []
for path in sys.argv[1:]:
    try:
        Patch.from_pretrained(path)
        results.append("loaded")
    except PatchFormatError as exc:
        results.append("PatchFormatError: " + str(exc))
    except MemoryError:
        results.append("MemoryError")
print(json.dumps(results))
"""


def test_a_hostile_config_allocates_nothing_it_asks_for(tmp_path: Path) -> None:
    """Widths and shapes from the file are checked before anything is allocated: under an address-space cap of
    768 MiB above what the process holds, every hostile folder is a ``PatchFormatError``, never a ``MemoryError``."""
    case = make_case("timm_cnn")
    saved = case.patch.save_pretrained(tmp_path / "good")
    folders = []
    for i, change in enumerate(
        [
            lambda c: c["source"]["architecture"]["kwargs"].update(channels=[2048, 2048, 2048, -8]),
            lambda c: c["branch"]["stubs"]["layer1"].update(shape=[2**20, 2**20, 2**20]),
            lambda c: c["target"].update(feature_shape=[2**20, 2**20, 2**20]),
            lambda c: c["adapter"].update(hidden=2**20),
            lambda c: c["gate"].update(num_features=2**20, num_components=2**16),
        ]
    ):
        folder = tmp_path / f"hostile{i}"
        folder.mkdir()
        config = json.loads((saved / CONFIG_NAME).read_text())
        change(config)
        (folder / CONFIG_NAME).write_text(json.dumps(config))
        (folder / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes())
        folders.append(str(folder))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _HOSTILE_LOAD, *folders], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r.split(":")[0] for r in results] == ["PatchFormatError"] * len(folders), results
    messages = [r.replace(str(tmp_path), "<tmp>").lower() for r in results]
    refused_for_memory = [m for m in messages if "alloc" in m or "memory" in m]
    assert refused_for_memory == []  # refused for what the file says, before trying to allocate it


# ---------------------------------------------------------------------------------------------- 4. atomic save


def test_a_save_interrupted_between_files_leaves_a_folder_that_is_refused_not_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = make_case("timm_cnn")
    folder = case.patch.save_pretrained(tmp_path / "p")
    other = fresh_patch(case)
    with torch.no_grad():
        other.adapter.proj.bias.add_(1.0)
    renames = []
    real_replace = os.replace

    def crash_after_first(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        renames.append(Path(dst).name)
        if len(renames) > 1:
            raise KeyboardInterrupt("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert renames == [WEIGHTS_NAME, CONFIG_NAME]  # the new weights landed, the new config did not
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])  # no debris
    with pytest.raises(PatchFormatError, match="two saves"):
        Patch.from_pretrained(folder)


def test_a_save_that_fails_before_writing_changes_nothing(tmp_path: Path) -> None:
    case = make_case("timm_cnn")
    folder = case.patch.save_pretrained(tmp_path / "p")
    (folder / CARD_NAME).write_text("---\n[broken yaml\n---\nnotes\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = fresh_patch(case)
    with torch.no_grad():
        other.adapter.proj.bias.add_(1.0)
    with pytest.raises(PatchFormatError, match="model card"):
        other.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---------------------------------------------------------------------------------------------- 5. links, modes


def test_save_never_writes_through_a_link_and_gives_all_files_one_mode(tmp_path: Path) -> None:
    case = make_case("timm_cnn")
    folder = tmp_path / "p"
    folder.mkdir()
    outside = tmp_path / "precious.json"
    outside.write_text('{"keep": true}')
    (folder / CONFIG_NAME).symlink_to(outside)
    case.patch.save_pretrained(folder)
    assert outside.read_text() == '{"keep": true}'
    assert not (folder / CONFIG_NAME).is_symlink()
    modes = {name: (folder / name).stat().st_mode & 0o777 for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)}
    assert len(set(modes.values())) == 1, modes


# ---------------------------------------------------------------------------------------------- 6. allowlist


def test_a_config_cannot_make_the_loader_read_a_local_file(tmp_path: Path) -> None:
    case = make_case("timm_cnn")
    folder = case.patch.save_pretrained(tmp_path / "p")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["source"]["architecture"]["kwargs"]["checkpoint_path"] = str(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(PatchFormatError, match="checkpoint_path"):
        Patch.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- 7. fingerprint


def test_a_patch_refuses_a_retrained_target_of_the_same_architecture() -> None:
    case = make_case("timm_cnn")
    retrained = timm_resnet(seed=99)  # same architecture, id and shapes; other weights
    with pytest.raises(PatchMismatchError, match="weights differ"):
        fresh_patch(case).attach(retrained)
    patch = fresh_patch(case)
    with pytest.warns(UserWarning, match="weights differ"):
        patch.attach(retrained, strict=False)
    patch.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh_patch(case).attach(
            copy.deepcopy(case.target).to(torch.bfloat16)
        ).float()  # a dtype cast is the same target


# ---------------------------------------------------------------------------------------------- 8. copies, export


def test_deepcopy_of_an_attached_model_carries_a_working_attachment() -> None:
    target, patch = attached_copy()
    x = images(3, 11)
    with torch.no_grad():
        expected = target(x)
    twin = copy.deepcopy(target)
    with torch.no_grad():
        assert torch.equal(twin(x), expected)
    patch.detach()
    with torch.no_grad():
        assert torch.equal(twin(x), expected)  # the copy has its own patch, still attached
        assert target(x).shape[1] == expected.shape[1] - len(patch.class_ids)
    assert not copy.deepcopy(patch).is_attached


def test_deepcopy_of_an_attached_patch_alone_comes_out_detached() -> None:
    _, patch = attached_copy()
    twin = copy.deepcopy(patch)
    assert twin.is_attached is False and patch.is_attached
    twin.attach(copy.deepcopy(make_case("timm_cnn").target))
    patch.detach()


def test_torch_save_of_an_attached_model_says_what_to_save_instead() -> None:
    target, patch = attached_copy()
    with pytest.raises(PatchStateError, match="state_dict"):
        torch.save(target, io.BytesIO())
    patch.detach()
    torch.save(target, io.BytesIO())


def test_jit_trace_of_an_attached_model_says_what_to_do_and_then_works() -> None:
    target, patch = attached_copy()
    x = images(2, 3)
    with pytest.raises(PatchStateError, match="requires_grad_"):
        torch.jit.trace(target, x, check_trace=False)
    patch.requires_grad_(False)
    with torch.no_grad():
        expected = target(x)
    traced = torch.jit.trace(target, x, check_trace=False)
    assert torch.equal(traced(x), expected)
    patch.detach()


def test_torch_export_of_an_attached_model_equals_eager() -> None:
    target, patch = attached_copy()
    x = images(2, 3)
    with torch.no_grad():
        expected = target(x)
    exported = torch.export.export(target, (x,))
    torch.testing.assert_close(exported.module()(x), expected, rtol=0, atol=1e-5)
    patch.detach()


# ---------------------------------------------------------------------------------------------- 9. precision


def test_a_bfloat16_target_never_changes_the_patch_precision(tmp_path: Path) -> None:
    target, patch = attached_copy()
    target.to(torch.bfloat16)
    with torch.no_grad():
        out = target(images(2, 4).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    patch.detach()
    assert {p.dtype for p in patch.parameters()} == {torch.float32}
    path = patch.save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    assert dtypes - {"I64"} == {"F32"}  # floats stay float32; BatchNorm counters are int64


# ---------------------------------------------------------------------------------------------- 12. Hub timeouts


@pytest.fixture
def silent_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A loopback endpoint that accepts connections and never answers, with 1 s Hub timeouts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    yield endpoint
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def test_loading_from_a_hub_that_never_answers_times_out_and_says_what_it_waited_for(silent_hub: str) -> None:
    assert silent_hub.startswith("http://127.0.0.1:"), "the Hub is a local socket that never answers"
    started = time.monotonic()
    with pytest.raises(HubTimeoutError, match=r"did not answer within .* patch_config\.json"):
        Patch.from_pretrained("alice/cats")
    assert time.monotonic() - started < 60


def test_pushing_to_a_hub_that_never_answers_times_out_and_says_what_it_waited_for(
    silent_hub: str, tmp_path: Path
) -> None:
    folder = make_case("timm_cnn").patch.save_pretrained(tmp_path / "p")
    started = time.monotonic()
    with pytest.raises(HubTimeoutError, match="did not answer within 1 s while pushing to alice/cats"):
        push_folder(folder, "alice/cats")
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------------------------------------- 13. push order


def test_push_checks_the_card_before_creating_the_remote_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_case("timm_cnn").patch.save_pretrained(tmp_path / "p")
    (folder / CARD_NAME).write_text("---\n[broken yaml\n---\nnotes\n")
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        with pytest.raises(PatchFormatError, match="model card"):
            push_folder(folder, "alice/cats")
        assert hub.requests == [] and hub.repos == {}


# ---------------------------------------------------------------------------------------------- 14. paths


def test_save_pretrained_onto_a_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "a_file"
    path.write_text("mine")
    with pytest.raises(InvalidInputError, match="is a file"):
        make_case("timm_cnn").patch.save_pretrained(path)
    assert path.read_text() == "mine"


def test_save_onto_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="is a folder"):
        make_case("timm_cnn").patch.save(tmp_path)


def test_a_symlink_loop_is_a_clear_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(InvalidInputError):
        make_case("timm_cnn").patch.save_pretrained(loop)
    with pytest.raises(PatchFormatError):
        Patch.from_pretrained(loop)
    folder = make_case("timm_cnn").patch.save_pretrained(tmp_path / "p")
    (folder / WEIGHTS_NAME).unlink()
    (folder / WEIGHTS_NAME).symlink_to(folder / WEIGHTS_NAME)
    with pytest.raises(PatchFormatError, match="cannot be followed"):
        Patch.from_pretrained(folder)
