"""Specification of the patch file format: :class:`PatchConfig` alone (no model is built), and files of format 1.

The config is the one door through which a patch file enters the library, so every field is checked here:
types, sizes against caps, architecture options against the family's allowlist, and fields that must agree.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pnc_surgery import Patch
from pnc_surgery.errors import PatchFormatError
from pnc_surgery.patch import FORMAT_VERSION, PatchConfig
from pnc_surgery.patch.config import MAX_FEATURE_VALUES, check_architecture

DATA = Path(__file__).parent / "data"
V1_FOLDER = DATA / "format_v1_resnet"


def v1_config() -> dict[str, Any]:
    """The config of a format-1 patch as it lies on disk (written before the typed config)."""
    return json.loads((V1_FOLDER / "patch_config.json").read_text())


def current_config() -> dict[str, Any]:
    """The same patch's config as this version writes it."""
    return PatchConfig.from_dict(v1_config()).to_dict()


def changed(path: str, value: Any, base: dict | None = None) -> dict:
    """A copy of ``base`` (default: :func:`current_config`) with the dotted ``path`` set to ``value``."""
    data = copy.deepcopy(base or current_config())
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


# ---------------------------------------------------------------------------------------------- round trip


def test_to_dict_then_from_dict_gives_the_same_config() -> None:
    config = PatchConfig.from_dict(current_config())
    assert PatchConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()  # plain JSON all the way down


def test_a_config_is_frozen() -> None:
    config = PatchConfig.from_dict(current_config())
    with pytest.raises(AttributeError):
        config.class_ids = (9,)  # type: ignore[misc]


def test_the_writer_writes_the_current_format_version() -> None:
    assert current_config()["format_version"] == FORMAT_VERSION == 2
    assert PatchConfig.from_dict(v1_config()).format_version == 1  # what the file said


# ---------------------------------------------------------------------------------------------- format 1 files


def _expected(name: str) -> torch.Tensor:
    return torch.tensor(json.loads((DATA / f"{name}_expected.json").read_text())["logits"])


def test_a_format_1_folder_loads_and_gives_the_outputs_it_gave_when_saved() -> None:
    from test_patch import images, timm_resnet

    patch = Patch.from_pretrained(V1_FOLDER)
    target = timm_resnet(1)
    with torch.no_grad(), patch.attached(target):
        out = target(images(3, 1))
    torch.testing.assert_close(out, _expected("format_v1_resnet"), rtol=0, atol=1e-6)


def test_a_format_1_single_file_loads_and_gives_the_outputs_it_gave_when_saved() -> None:
    from test_patch import hf_bert, text

    patch = Patch.load(DATA / "format_v1_bert.safetensors")
    target = hf_bert(1)
    with torch.no_grad(), patch.attached(target):
        out = target(**text(3, 1)).logits
    torch.testing.assert_close(out, _expected("format_v1_bert"), rtol=0, atol=1e-6)


def test_a_format_1_patch_saved_again_is_written_in_the_current_format(tmp_path: Path) -> None:
    folder = Patch.from_pretrained(V1_FOLDER).save_pretrained(tmp_path / "again")
    data = json.loads((folder / "patch_config.json").read_text())
    assert data["format_version"] == FORMAT_VERSION and len(data["tensors_sha256"]) == 64


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("classes.ids", 3, "classes.ids"),
        ("classes.ids", [1, "3"], "classes.ids"),
        ("classes.ids", [1, 1], "no repeats"),
        ("classes.names", ["only one"], "as many names as ids"),
        ("classes.ids", [True, 3], "classes.ids"),
        ("target.num_classes", 0, "target.num_classes"),
        ("target.num_classes", 2.5, "target.num_classes"),
        ("target.feature_shape", [16, 4, -4], r"target.feature_shape\[2\]"),
        ("target.feature_shape", [2**20, 2**20], "values an example"),
        ("target.family", "keras", "target.family"),
        ("target.weights_sample", [1.0, float("nan")], "finite"),
        ("cut.layout", "NCWH", "cut.layout"),
        ("insertion.name", 7, "insertion.name"),
        ("gate.kind", "magic", "gate.kind"),
        ("gate.num_positive", 2, "num_positive"),
        ("adapter.hidden", -4, "adapter.hidden"),
        ("adapter.insertion.grid", [4, 4, 4], "adapter.insertion.grid"),
        ("branch.input_dtype", "object", "branch.input_dtype"),
        ("branch.stubs.layer1.stored", "yes", "stored"),
        ("metrics.accuracy", float("inf"), "finite"),
        ("tensors_sha256", "not a digest", "sha256"),
        ("format_version", 99, "newer than this pnc_surgery"),
        ("format_version", "2", "positive integer"),
    ],
)
def test_a_field_of_the_wrong_type_or_size_is_named(path: str, value: Any, message: str) -> None:
    with pytest.raises(PatchFormatError, match=message):
        PatchConfig.from_dict(changed(path, value), "patch_config.json")


def test_fields_that_must_agree_are_checked() -> None:
    with pytest.raises(PatchFormatError, match=r"branch\.cut must equal cut\.name"):
        PatchConfig.from_dict(changed("cut.name", "layer4"))
    with pytest.raises(PatchFormatError, match=r"adapter\.insertion\.shape must equal target\.feature_shape"):
        PatchConfig.from_dict(changed("target.feature_shape", [16, 2, 2]))


def test_a_huge_list_makes_a_short_message() -> None:
    with pytest.raises(PatchFormatError) as info:
        PatchConfig.from_dict(changed("classes.names", ["x"] * 10**6))
    assert len(str(info.value)) < 300


def test_deeply_nested_json_is_refused_cleanly() -> None:
    deep: Any = 0
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(PatchFormatError):
        PatchConfig.from_dict(changed("metrics.deep", deep))


def test_the_max_feature_size_cap_is_what_the_self_test_may_allocate() -> None:
    assert MAX_FEATURE_VALUES * 4 <= 64 * 2**20  # one float32 example of at most 64 MiB


@pytest.mark.parametrize(
    "option",
    [
        "checkpoint_path",
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "cache_dir",
        "features_only",
        "no_such_option",
    ],
)
def test_timm_options_outside_the_allowlist_are_refused(option: str) -> None:
    architecture = current_config()["source"]["architecture"]
    architecture["kwargs"][option] = "/etc/passwd"
    with pytest.raises(PatchFormatError, match=option):
        check_architecture(architecture)


@pytest.mark.parametrize(
    "option", ["auto_map", "_attn_implementation", "trust_remote_code", "quantization_config", "no_such"]
)
def test_transformers_options_outside_the_allowlist_are_refused(option: str) -> None:
    architecture = {"family": "transformers", "class": "BertForSequenceClassification", "config": {"hidden_size": 32}}
    check_architecture(architecture)  # an architecture field is fine
    architecture["config"][option] = {"AutoModel": "evil.Model"}
    with pytest.raises(PatchFormatError, match=option):
        check_architecture(architecture)


def test_special_token_ids_a_config_sets_only_through_its_keywords_are_architecture_fields() -> None:
    """T5's forward needs its decoder start id, which its config takes only as a keyword: a T5 patch must save."""
    config = {"d_model": 32, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
    check_architecture({"family": "transformers", "class": "T5ForSequenceClassification", "config": config})


def test_a_transformers_class_that_is_not_a_classifier_is_refused() -> None:
    with pytest.raises(PatchFormatError, match="ForImageClassification"):
        check_architecture({"family": "transformers", "class": "BertModel", "config": {}})
