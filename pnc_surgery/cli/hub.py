"""The ``push`` and ``info`` commands of ``pnc-surgery``: share a saved patch, and inspect one without a model.

``info`` reads the patch config and the safetensors header only (shapes and dtypes, never the tensor data),
so it is quick on any patch, needs neither the source nor the target model, and runs no code from the patch.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..hub import push_folder, resolve_patch_folder
from ..patch.serialization import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, open_safetensors, read_config

__all__ = ["patch_info", "register"]

# Bits per element of each safetensors dtype (sub-byte float formats pack several elements per byte).
_DTYPE_BITS = {
    name: bits
    for bits, names in {
        4: "F4",
        6: "F6_E2M3 F6_E3M2",
        8: "BOOL U8 I8 F8_E5M2 F8_E4M3 F8_E8M0",
        16: "U16 I16 F16 BF16",
        32: "U32 I32 F32",
        64: "U64 I64 F64 C64",
    }.items()
    for name in names.split()
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``push`` and ``info`` subcommands; each sets ``func`` to a handler returning an exit code."""
    push = subparsers.add_parser(
        "push",
        help="upload a saved patch folder to a Hugging Face Hub model repo",
        description="Upload the patch files of DIR (config, safetensors, model card) to REPO_ID in one commit, "
        "creating the repo if needed. Other files in DIR are not uploaded.",
    )
    push.add_argument("dir", metavar="DIR", help="folder written by Patch.save_pretrained")
    push.add_argument("repo_id", metavar="REPO_ID", help="model repo, as namespace/name")
    push.add_argument("--private", action="store_true", default=None, help="make the repo private if this creates it")
    push.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the `hf auth login` one)")
    push.add_argument("--revision", help="branch to commit to, or the base of the pull request (default: main)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--message", help="commit message (default: names the classes and models)")
    push.set_defaults(func=_push)

    info = subparsers.add_parser(
        "info",
        help="describe a patch (models, points, classes, sizes, metrics) without loading any model",
        description="Describe the patch in a local folder or Hub repo from its config and safetensors header.",
    )
    info.add_argument("patch", metavar="REPO_ID_OR_DIR", help="patch folder or Hub repo id")
    info.add_argument("--revision", help="branch, tag or commit of the Hub repo (default: main)")
    info.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object instead of text")
    info.set_defaults(func=_info)


def patch_info(folder: Path) -> dict[str, Any]:
    """Everything ``info`` reports about the patch in ``folder``, as JSON-ready data."""
    config = read_config(folder / CONFIG_NAME)
    tensors = _tensor_table(folder / WEIGHTS_NAME)
    return {
        "folder": str(folder),
        "format_version": config.format_version,
        "pnc_surgery_version": config.versions.get("pnc_surgery"),
        "source": config.source.id,
        "target": config.target.id,
        "target_num_classes": config.target.num_classes,
        "cut": config.cut.name,
        "insertion": config.insertion.name,
        "classes": [{"id": i, "name": name} for i, name in zip(config.class_ids, config.class_names)],
        "num_values": sum(t["numel"] for t in tensors.values()),  # parameters and buffers: the header cannot tell
        "tensor_bytes": sum(t["bytes"] or 0 for t in tensors.values()),
        "file_bytes": {
            name: (folder / name).stat().st_size
            for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
            if (folder / name).is_file()
        },
        "tensors": tensors,
        "metrics": dict(config.metrics),
    }


def _tensor_table(path: Path) -> dict[str, dict[str, Any]]:
    """Name -> dtype, shape, element count and bytes of each tensor, from the safetensors header alone."""
    table: dict[str, dict[str, Any]] = {}
    with open_safetensors(path) as handle:
        for name in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
            view = handle.get_slice(name)
            shape, dtype = list(view.get_shape()), view.get_dtype()
            numel, bits = math.prod(shape), _DTYPE_BITS.get(dtype)
            size = None if bits is None else math.ceil(numel * bits / 8)  # None: a dtype newer than this table
            table[name] = {"dtype": dtype, "shape": shape, "numel": numel, "bytes": size}
    return table


def _push(args: argparse.Namespace) -> int:
    url = push_folder(
        args.dir,
        args.repo_id,
        private=args.private,
        token=args.token,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.message,
    )
    print(url)
    return 0


def _info(args: argparse.Namespace) -> int:  # errors go through cli.errors.report, like every command's
    info = patch_info(resolve_patch_folder(args.patch, revision=args.revision))
    print(json.dumps(info, indent=2) if args.as_json else _format_info(info))
    return 0


def _format_info(info: dict[str, Any]) -> str:
    """The human-readable report: one fact a line, tensors summed per top-level module of the patch."""
    own = first = info["target_num_classes"]
    lines = [
        f"patch:        {info['folder']}",
        f"format:       version {info['format_version']} (made with pnc_surgery {info['pnc_surgery_version'] or '?'})",
        f"source:       {info['source']}  (cut after {info['cut']})",
        f"target:       {info['target']}  (insertion at {info['insertion']})",
        f"classes:      {len(info['classes'])} cloned, after the target's own {own or '?'}",
        *(f"  output {first + i:<6} id {c['id']!s:<8} {c['name'] or ''}" for i, c in enumerate(info["classes"])),
        (
            f"tensors:      {len(info['tensors'])}, {info['num_values']:,} values (parameters and buffers), "
            f"{info['tensor_bytes']:,} bytes"
        ),
    ]
    groups: dict[str, list[int]] = {}
    for name, tensor in info["tensors"].items():
        group = groups.setdefault(name.split(".", 1)[0], [0, 0, 0])
        group[0], group[1], group[2] = group[0] + 1, group[1] + tensor["numel"], group[2] + (tensor["bytes"] or 0)
    lines += [
        f"  {name:<12} {n} tensors, {numel:,} values, {size:,} bytes" for name, (n, numel, size) in groups.items()
    ]
    lines.append("files:")
    lines += [f"  {name:<26} {size:,} bytes" for name, size in info["file_bytes"].items()]
    lines.append("metrics:" if info["metrics"] else "metrics:      none recorded")
    width = max([26, *(len(name) for name in info["metrics"])])
    lines += [
        f"  {name:<{width}} {value:.4g}" if isinstance(value, float) else f"  {name:<{width}} {value}"
        for name, value in info["metrics"].items()
    ]
    return "\n".join(lines)
