"""Reading patch files: the size caps and the checks that run before any tensor is read.

Each test writes a small file by hand and expects :class:`PatchFormatError` naming what is wrong; the caps are
lowered with ``monkeypatch`` so no test needs a large file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from pnc_surgery.errors import PatchFormatError
from pnc_surgery.patch import serialization
from pnc_surgery.patch.serialization import open_safetensors, read_config, read_tensors

TENSORS = {"a": torch.zeros(2, 3), "b": torch.ones(4)}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def with_metadata(metadata: object) -> bytes:
    """A safetensors file of :data:`TENSORS` whose header's ``__metadata__`` is ``metadata`` (any JSON)."""
    data = save(TENSORS)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def test_a_valid_file_reads_back_with_its_metadata(tmp_path: Path) -> None:
    tensors, metadata = read_tensors(write(tmp_path / "p.safetensors", save(TENSORS, metadata={"k": "v"})))
    assert metadata == {"k": "v"}
    assert all(torch.equal(tensors[name], TENSORS[name]) for name in TENSORS)


def test_a_header_over_the_cap_is_refused_before_safe_open_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "p.safetensors", save(TENSORS))
    monkeypatch.setattr(serialization, "MAX_HEADER_BYTES", int.from_bytes(path.read_bytes()[:8], "little") - 1)
    with pytest.raises(PatchFormatError, match=r"header claims .* bytes, more than"):
        read_tensors(path)


def test_a_header_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    data = save(TENSORS)
    path = write(tmp_path / "p.safetensors", len(data).to_bytes(8, "little") + data[8:])
    with pytest.raises(PatchFormatError, match="not a valid safetensors file"):
        read_tensors(path)


def test_pickle_is_refused_by_name_and_by_content(tmp_path: Path) -> None:
    payload = pickle.dumps({"weights": [1.0, 2.0]})
    with pytest.raises(PatchFormatError, match="pickle-based"):
        read_tensors(write(tmp_path / "p.bin", payload))
    with pytest.raises(PatchFormatError, match="not a valid safetensors file"):
        read_tensors(write(tmp_path / "p.safetensors", payload))


def test_metadata_must_map_strings_to_strings(tmp_path: Path) -> None:
    for i, metadata in enumerate([{"k": 3}, {"k": {"nested": "v"}}, ["k"], "k"]):
        with pytest.raises(PatchFormatError, match="not a valid safetensors file"):
            read_tensors(write(tmp_path / f"m{i}.safetensors", with_metadata(metadata)))


def test_more_tensors_than_the_cap_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serialization, "MAX_TENSORS", 1)
    with pytest.raises(PatchFormatError, match="2 tensors, more than the 1 allowed"):
        read_tensors(write(tmp_path / "p.safetensors", save(TENSORS)))


def test_non_finite_tensors_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "p.safetensors", save({**TENSORS, "b": torch.tensor([1.0, float("nan")])}))
    with pytest.raises(PatchFormatError, match=r"non-finite values .* \['b'\]"):
        read_tensors(path)


def test_open_safetensors_reads_shapes_without_tensor_data(tmp_path: Path) -> None:
    with open_safetensors(write(tmp_path / "p.safetensors", save(TENSORS))) as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}  # noqa: SIM118
    assert shapes == {"a": [2, 3], "b": [4]}


def test_a_config_over_the_cap_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / serialization.CONFIG_NAME, b"{}" + b" " * 100)
    monkeypatch.setattr(serialization, "MAX_CONFIG_BYTES", 10)
    with pytest.raises(PatchFormatError, match="config is 102 bytes, more than the 10 allowed"):
        read_config(path)


def test_a_config_that_is_not_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PatchFormatError, match="not valid JSON"):
        read_config(write(tmp_path / serialization.CONFIG_NAME, b"{not json"))
