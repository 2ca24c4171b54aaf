"""Fuzzing the patch loader: a damaged or hostile patch file is refused with a ``PncError``, or it loads.

Real patches (a timm ResNet patch and a BERT patch, built by hand) are saved in both forms; hypothesis then flips,
overwrites, truncates, inserts and deletes bytes of the single file and of the folder's files, and replaces or
deletes values anywhere in ``patch_config.json`` (and in the config embedded in the single file). Whatever it does,
:meth:`Patch.load` and :meth:`Patch.from_pretrained` either return a patch or raise a subclass of
:class:`pnc_surgery.errors.PncError`: no ``KeyError``, ``TypeError``, ``IndexError`` or safetensors exception leaks
out, and nothing is unpickled.

Integers written into configs stay small: sizes taken from a config are not bounded before modules are built, so
a config asking for 2**40 channels or 2**62 layers tests the machine's memory, not the loader's checks.
"""

from __future__ import annotations

import copy
import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from pnc_surgery.backends.timm import create_model
from pnc_surgery.errors import PncError
from pnc_surgery.patch import Patch, serialization

FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------------------------------------- real patches
def _resnet_patch() -> tuple[Patch, torch.nn.Module, Any]:
    kwargs = {"channels": (4, 8, 8, 8), "stem_width": 4, "zero_init_last": False}
    torch.manual_seed(0)
    source = create_model("resnet18", num_classes=5, **kwargs).eval()
    torch.manual_seed(1)
    target = create_model("resnet18", num_classes=7, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return Patch.assemble(source, target, "layer3", "layer2", [1, 3], source_input=x, target_input=x), target, x


def _bert_patch() -> tuple[Patch, torch.nn.Module, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    def bert(seed: int, labels: int) -> Any:
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=labels,
        )
        return BertForSequenceClassification(config).eval()

    ids = torch.randint(5, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    target = bert(1, 6)
    patch = Patch.assemble(
        bert(0, 4), target, "bert.encoder.layer.0", "bert.encoder.layer.0", [0, 3], source_input=x, target_input=x
    )
    return patch, target, x


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per patch: the single file's bytes, the folder's files' bytes, the config, its target and an input, and where
    to write mutants."""
    root = tmp_path_factory.mktemp("fuzz")
    result = {}
    for name, (patch, target, example) in [("resnet", _resnet_patch()), ("bert", _bert_patch())]:
        single = patch.save(root / f"{name}.safetensors")
        folder = patch.save_pretrained(root / f"{name}-folder")
        Patch.load(single), Patch.from_pretrained(folder)  # the originals load
        result[name] = {
            "single": single.read_bytes(),
            "folder": {f.name: f.read_bytes() for f in folder.iterdir()},
            "config": json.loads((folder / serialization.CONFIG_NAME).read_text()),
            "work": root / f"{name}-work",
            "target": target,
            "input": example,
        }
    return result


def loads_or_refuses(load: Any, where: Path) -> Patch | None:
    """Run a loader; a ``PncError`` is a refusal, any other exception fails the test (hypothesis shows it)."""
    try:
        return load(where)
    except PncError:
        return None


# ---------------------------------------------------------------------------------------------- byte mutations
def _header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else len(data)


@st.composite
def byte_edits(draw: st.DrawFn, size: int, header_end: int) -> list[tuple]:
    """1-4 edits; most positions fall in the 8-byte length and the JSON header, where the structure lives."""
    position = st.one_of(st.integers(0, 7), st.integers(0, max(0, header_end - 1)), st.integers(0, max(0, size - 1)))
    edit = st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("set"), position, st.integers(0, 255)),
        st.tuples(st.just("truncate"), position),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), position, st.integers(1, 16)),
        st.tuples(st.just("digit"), position, st.sampled_from(b"0123456789")),
    )
    return draw(st.lists(edit, min_size=1, max_size=4))


def apply_edits(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, pos, *args in edits:
        pos = min(pos, max(0, len(out) - 1))
        if kind == "flip" and out:
            out[pos] ^= 1 << args[0]
        elif kind == "set" and out:
            out[pos] = args[0]
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = args[0]
        elif kind == "delete":
            del out[pos : pos + args[0]]
        elif kind == "digit" and out:
            out[pos] = args[0]
    return bytes(out)


def _write_folder(work: Path, contents: dict[str, bytes]) -> Path:
    work.mkdir(exist_ok=True)
    for name in {serialization.CONFIG_NAME, serialization.WEIGHTS_NAME, serialization.CARD_NAME}:
        path = work / name
        if name in contents:
            path.write_bytes(contents[name])
        elif path.exists():
            path.unlink()
    return work


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_mutated_single_file_loads_or_raises_a_pnc_error(saved: dict, name: str) -> None:
    data = saved[name]["single"]
    work = saved[name]["work"]
    work.mkdir(exist_ok=True)
    path = work / "mutant.safetensors"

    @FUZZ
    @given(edits=byte_edits(len(data), _header_end(data)))
    def check(edits: list[tuple]) -> None:
        path.write_bytes(apply_edits(data, edits))
        loads_or_refuses(Patch.load, path)

    check()


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_mutated_folder_files_load_or_raise_a_pnc_error(saved: dict, name: str) -> None:
    original = saved[name]["folder"]
    work = saved[name]["work"] / "folder"
    weights, config = original[serialization.WEIGHTS_NAME], original[serialization.CONFIG_NAME]

    @FUZZ
    @given(
        which=st.sampled_from([serialization.WEIGHTS_NAME, serialization.CONFIG_NAME, serialization.CARD_NAME]),
        weight_edits=byte_edits(len(weights), _header_end(weights)),
        config_edits=byte_edits(len(config), len(config)),
        drop=st.sampled_from(
            [None, None, None, serialization.CONFIG_NAME, serialization.WEIGHTS_NAME, serialization.CARD_NAME]
        ),
    )
    def check(which: str, weight_edits: list[tuple], config_edits: list[tuple], drop: str | None) -> None:
        contents = dict(original)
        if which == serialization.WEIGHTS_NAME:
            contents[which] = apply_edits(weights, weight_edits)
        else:
            contents[which] = apply_edits(original[which], config_edits)
        if drop is not None:
            del contents[drop]
        loads_or_refuses(Patch.from_pretrained, _write_folder(work, contents))

    check()


# ---------------------------------------------------------------------------------------------- JSON mutations
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 64)
    | st.sampled_from(
        [0, 1, -1, 300, 1e308, float("nan"), float("inf"), "", "meta", "NCHW", "NLC", "float16", "__init__"]
    )
    | st.floats(-1e3, 1e3)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document: dict keys and list indices, depth-first."""
    found = []
    if isinstance(value, dict):
        for key, child in value.items():
            found.append((*prefix, key))
            found.extend(_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found.append((*prefix, i))
            found.extend(_paths(child, (*prefix, i)))
    return found


@st.composite
def config_edits(draw: st.DrawFn, config: dict) -> list[tuple]:
    """1-3 edits: replace a value (often by a near neighbour of an integer), delete it, or swap in a wrong type."""
    paths = _paths(config)
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "nudge", "delete"]))
        edits.append((path, action, draw(JSON_VALUES) if action == "replace" else draw(st.integers(-2, 2))))
    return edits


def apply_config_edits(config: dict, edits: list[tuple]) -> dict:
    config = copy.deepcopy(config)
    for path, action, value in edits:
        parent: Any = config
        try:
            for step in path[:-1]:
                parent = parent[step]
            last = path[-1]
            old = parent[last]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this place
        if action == "delete":
            del parent[last]
        elif action == "nudge":
            parent[last] = old + value if isinstance(old, int) and not isinstance(old, bool) else value
        else:
            parent[last] = value
    return config


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_mutated_config_values_in_the_folder_load_or_raise_a_pnc_error(saved: dict, name: str) -> None:
    original, config = saved[name]["folder"], saved[name]["config"]
    work = saved[name]["work"] / "json"

    @FUZZ
    @given(edits=config_edits(config))
    def check(edits: list[tuple]) -> None:
        mutated = apply_config_edits(config, edits)
        contents = {**original, serialization.CONFIG_NAME: json.dumps(mutated).encode()}
        loads_or_refuses(Patch.from_pretrained, _write_folder(work, contents))

    check()


def _single_file_parts(saved: dict, name: str) -> tuple[Path, dict, dict, dict]:
    """The case's work folder, and the tensors, metadata and config of its saved single-file patch."""
    work = saved[name]["work"]
    work.mkdir(exist_ok=True)
    original = work / "original.safetensors"
    original.write_bytes(saved[name]["single"])
    tensors, metadata = serialization.read_tensors(original)
    return work, tensors, metadata, json.loads(metadata[serialization.METADATA_KEY])


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_mutated_config_values_in_the_single_file_load_or_raise_a_pnc_error(saved: dict, name: str) -> None:
    work, tensors, metadata, config = _single_file_parts(saved, name)
    path = work / "json-mutant.safetensors"

    @FUZZ
    @given(edits=config_edits(config))
    def check(edits: list[tuple]) -> None:
        mutated = apply_config_edits(config, edits)
        save_file(tensors, path, {**metadata, serialization.METADATA_KEY: json.dumps(mutated)})
        loads_or_refuses(Patch.load, path)

    check()


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_a_patch_loaded_from_a_mutated_config_attaches_and_runs_or_raises_a_pnc_error(saved: dict, name: str) -> None:
    """What the loader accepts, attach and the forward handle: the model runs with the cloned columns, or a
    ``PncError`` says why; either way no hook is left and the target's own logits are untouched."""
    work, tensors, metadata, config = _single_file_parts(saved, name)
    path = work / "attach-mutant.safetensors"
    target, example = saved[name]["target"], saved[name]["input"]

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = target(**example) if isinstance(example, dict) else target(example)
        return out if isinstance(out, torch.Tensor) else out.logits

    expected = run()

    @FUZZ
    @given(edits=config_edits(config))
    def check(edits: list[tuple]) -> None:
        mutated = apply_config_edits(config, edits)
        save_file(tensors, path, {**metadata, serialization.METADATA_KEY: json.dumps(mutated)})
        patch = loads_or_refuses(Patch.load, path)
        if patch is None:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # strict=False warns about a changed target id
                with patch.attached(target, strict=False):
                    logits = run()
            assert torch.equal(logits[:, : expected.shape[1]], expected)
            assert logits.shape[1] == expected.shape[1] + len(patch.class_ids)
        except PncError:
            pass
        assert not patch.is_attached
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in target.modules())

    check()
