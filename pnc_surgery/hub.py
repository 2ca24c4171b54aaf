"""Sharing patches on the Hugging Face Hub: finding a patch folder to load, pushing one, and its model card.

``Patch`` gets ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` from ``huggingface_hub.ModelHubMixin``;
this module is what those methods call. Loading is one ``snapshot_download`` of the patch files (cache, revisions,
tokens, ``HF_HUB_OFFLINE`` as for transformers); pushing is one ``create_commit`` of those files only, after
everything local is checked. Pickle weights and paths or links leading out of the folder are refused. Every request,
API calls included (``huggingface_hub`` bounds only its downloads), waits at most ``HF_HUB_DOWNLOAD_TIMEOUT`` /
``HF_HUB_ETAG_TIMEOUT`` for an answer, else :class:`HubTimeoutError`. The card is rendered from the ``ModelCard``
template ``patch_card.md``; on the next save or push only its metadata and the text between its markers are rewritten.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path, PureWindowsPath
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants, errors
from huggingface_hub.utils import get_session, validate_repo_id

from .errors import HubTimeoutError, InvalidInputError, PatchFormatError
from .patch.config import PatchConfig
from .patch.serialization import CARD_NAME, CONFIG_NAME, PATCH_FILES, WEIGHTS_NAME, read_config

__all__ = ["CARD_TAGS", "CARD_TEMPLATE", "build_model_card", "card_for_folder", "push_folder", "resolve_patch_folder"]

CARD_TAGS = ("pnc_surgery", "partial-network-cloning", "model-patch")
CARD_TEMPLATE = files(__package__).joinpath("patch_card.md").read_text(encoding="utf-8")
_GENERATED = re.compile(r"<!-- pnc_surgery:start.*?<!-- pnc_surgery:end -->", re.DOTALL)  # the card's own part
_LIMIT: contextvars.ContextVar[float | None] = contextvars.ContextVar("pnc_surgery_hub_timeout", default=None)


def _cap_timeout(request: Any) -> None:
    """httpx request hook: inside :func:`_deadline`, no request waits longer than its limit for an answer."""
    if (limit := _LIMIT.get()) is not None:
        old = request.extensions.get("timeout") or dict.fromkeys(("connect", "read", "write", "pool"))
        request.extensions["timeout"] = {kind: min(seconds or limit, limit) for kind, seconds in old.items()}


@contextmanager
def _deadline(doing: str) -> Iterator[None]:
    """Run Hub calls with finite timeouts; a timeout (or an error it caused) becomes :class:`HubTimeoutError`."""
    limit = float(max(constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT))  # as set now
    if _cap_timeout not in (hooks := get_session().event_hooks["request"]):
        hooks.append(_cap_timeout)
    token = _LIMIT.set(limit)
    try:
        yield
    except Exception as exc:
        if _timed_out(exc):
            raise HubTimeoutError(
                f"the Hub at {constants.ENDPOINT} did not answer within {limit:g} s while {doing} "
                "(set HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT to wait longer)"
            ) from None
        raise
    finally:
        _LIMIT.reset(token)


def _timed_out(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what caused it is a network timeout (``huggingface_hub`` wraps them in its own errors)."""
    for _ in range(16):  # cause chains can loop
        if exc is None or isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
            return exc is not None
        exc = exc.__cause__ or exc.__context__
    return False


def _api(token: str | bool | None = None) -> HfApi:
    """A Hub client that names this library in its user agent (imported late: the package imports this module)."""
    from . import __version__

    return HfApi(token=token, library_name="pnc_surgery", library_version=__version__)


# --------------------------------------------------------------------------------------------- loading


def resolve_patch_folder(
    repo_id_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """The local folder holding a patch's files (``patch_config.json``, ``patch_model.safetensors``, maybe
    ``README.md``, all from one commit), downloaded from the Hub through its cache if needed; a local directory wins
    over a Hub repo of the same name. Arguments as for :meth:`pnc_surgery.Patch.from_pretrained`.

    Raises:
        PatchFormatError: nothing loadable there (missing, pickle weights, unsafe links, Hub errors).
        HubTimeoutError: the Hub did not answer in time.
        InvalidInputError: ``subfolder`` leaves the repo, or the options contradict each other.
    """
    if not isinstance(repo_id_or_dir, (str, os.PathLike)):
        raise InvalidInputError(f"expected a folder or a Hub repo id, got {type(repo_id_or_dir).__name__}")
    parts = _subfolder_parts(subfolder)
    local = Path(repo_id_or_dir)
    try:
        is_dir, exists = local.is_dir(), local.exists()
    except OSError as exc:  # a link loop, a name too long
        raise PatchFormatError(f"{local}: cannot be read ({exc})") from None
    if is_dir:
        _check_links(local, ["/".join(parts)])  # a subfolder may be a link too
        return _check_patch_folder(local.joinpath(*parts))
    if exists:
        raise PatchFormatError(f"{local} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    repo_id = os.fspath(repo_id_or_dir)
    if isinstance(repo_id_or_dir, os.PathLike) or not _is_repo_id(repo_id):
        raise PatchFormatError(f"{repo_id}: no such folder, and not a Hub repo id of the form 'namespace/name'")
    if force_download and (local_files_only or constants.is_offline_mode()):
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        raise InvalidInputError(f"force_download=True needs the network, but {why}")
    prefix = "".join(f"{part}/" for part in parts)
    where = repo_id + (f" (subfolder {prefix[:-1]!r})" if prefix else "") + (f" at {revision=}" if revision else "")
    api = _api(token)

    def listing() -> list[str]:  # what the repo's folder holds, to say why it is no patch
        paths = api.list_repo_files(repo_id, revision=revision)
        return [path[len(prefix) :] for path in paths if path.startswith(prefix) and "/" not in path[len(prefix) :]]

    with _deadline(f"downloading {', '.join(PATCH_FILES)} of {repo_id} (not in the local cache)"):
        try:
            snapshot = api.snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[prefix + name for name in PATCH_FILES],
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
            )
        except (errors.HfHubHTTPError, OSError) as exc:  # their messages say what to do (offline, not found, gated)
            raise PatchFormatError(f"{where}: not a local folder, and not loadable from the Hub ({exc})") from exc
        return _check_patch_folder(Path(snapshot).joinpath(*parts), where, listing)


def _subfolder_parts(subfolder: str | None) -> tuple[str, ...]:
    """Split a subfolder into path parts, refusing anything that could leave the repo (POSIX or Windows)."""
    if not isinstance(subfolder, (str, type(None))):
        raise InvalidInputError(f"subfolder must be a string, got {type(subfolder).__name__}")
    text = subfolder or ""
    parts = tuple(part for part in text.replace("\\", "/").split("/") if part not in ("", "."))
    if text.startswith(("/", "\\")) or PureWindowsPath(text).anchor or ".." in parts:
        raise InvalidInputError(f"subfolder {subfolder!r} must be a relative path inside the repo, without '..'")
    return parts


def _is_repo_id(text: str) -> bool:
    """Whether ``text`` is a syntactically valid Hub repo id (no network)."""
    try:
        validate_repo_id(text)
    except errors.HFValidationError:
        return False
    return True


def _check_links(folder: Path, names: Sequence[str]) -> None:
    """Refuse any path ``names`` in ``folder`` that, once links are followed, leaves it (e.g. to ``~/.ssh``) or loops.

    The files of a Hub cache snapshot (``models--x--y/snapshots/<commit>/``) may lead into the repo's ``blobs/``.
    """
    root = folder.resolve()
    snapshots = next((p for p in (root, *root.parents) if p.name == "snapshots"), None)
    roots = [root] if snapshots is None else [root, snapshots.parent / "blobs"]
    for path in (folder / name for name in names if os.path.lexists(folder / name)):  # links to nothing too
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise PatchFormatError(f"{path} is a link that cannot be followed ({exc}); refusing to use it") from None
        if not any(target.is_relative_to(r) for r in roots):
            raise PatchFormatError(f"{path} is a link to {target}, outside the patch folder; refusing to use it")


def _check_patch_folder(folder: Path, where: str = "", listing: Callable[[], list[str]] | None = None) -> Path:
    """Return ``folder`` if it holds a patch whose files all stay inside it.

    ``where`` names it in errors (default: the folder), ``listing()`` says what it holds (default: its files), so that
    a place that is no patch (a pickle checkpoint, say) is named for what it is.
    """
    where = where or str(folder)
    _check_links(folder, PATCH_FILES)
    if not (folder / CONFIG_NAME).is_file():
        try:
            held = sorted(listing() if listing else [p.name for p in folder.iterdir() if p.is_file()])
        except (errors.HfHubHTTPError, OSError):  # no such folder, or the Hub cannot be asked (offline, say)
            held = []
        listed = f"it holds: {', '.join(held[:8])}" if held else "nothing there"
        raise PatchFormatError(
            f"{where}: no {CONFIG_NAME} ({listed}); is this a pnc_surgery patch? "
            "(patches are JSON + safetensors; pickle checkpoints are never downloaded or loaded)"
        )
    if not (folder / WEIGHTS_NAME).is_file():
        raise PatchFormatError(f"{where}: has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return folder


# --------------------------------------------------------------------------------------------- pushing


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a saved patch folder to a Hub model repo in one commit, creating the repo if needed; returns the URL of
    the commit (of the pull request with ``create_pr``). Arguments as for :meth:`pnc_surgery.Patch.push_to_hub`.

    Everything local is checked first, so a bad folder leaves nothing behind on the Hub; only the patch files are
    uploaded. The card is the repo's (else the folder's) with its metadata and generated part brought up to date.
    """
    if not isinstance(repo_id, str) or not _is_repo_id(repo_id):
        raise InvalidInputError(f"repo_id must look like 'namespace/name', got {repo_id!r}")
    folder = _check_patch_folder(Path(folder))  # never upload a file that a link pulls in from elsewhere
    config = read_config(folder / CONFIG_NAME)
    card = card_for_folder(folder, config, repo_id)  # a card that cannot be read fails here, before the Hub is touched
    api = _api(token)
    with _deadline(f"pushing to {repo_id}"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)  # pushing to a new branch just works
        with tempfile.TemporaryDirectory() as cache:  # the repo's own card wins; not left stale in the user's cache
            try:
                remote = Path(api.hf_hub_download(repo_id, CARD_NAME, revision=revision, cache_dir=cache))
                card = card_for_folder(remote.parent, config, repo_id)
            except (errors.HfHubHTTPError, OSError, PatchFormatError) as exc:  # none, or unreadable: the folder's
                if _timed_out(exc):
                    raise
        info = api.create_commit(
            repo_id,
            [CommitOperationAdd(name, folder / name) for name in (CONFIG_NAME, WEIGHTS_NAME)]
            + [CommitOperationAdd(CARD_NAME, card.encode())],
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload pnc_surgery patch: {_summary(config)}",
        )
    return info.pr_url if create_pr and info.pr_url else info.commit_url


# --------------------------------------------------------------------------------------------- model card


def build_model_card(config: PatchConfig, repo_id_or_dir: str = "<repo_or_dir>") -> ModelCard:
    """The model card of a patch, rendered from :data:`CARD_TEMPLATE` and the config alone.

    Args:
        config: the patch config.
        repo_id_or_dir: what the loading snippet passes to ``Patch.from_pretrained``.
    """
    base_models = list(dict.fromkeys(i for i in (config.target.id, config.source.id) if "/" in i and _is_repo_id(i)))
    data = ModelCardData(library_name="pnc_surgery", base_model=base_models or None, tags=list(CARD_TAGS))
    data["base_model_relation"] = "adapter" if base_models else None  # it plugs into the target; not a merge
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        config=config,
        summary=_summary(config),
        where=json.dumps(repo_id_or_dir),
        cell=_cell,
        code=lambda value: f"`` {value} ``" if "`" in value else f"`{value}`",  # inline code, backticks and all
    )


def card_for_folder(folder: Path, config: PatchConfig, where: str | None = None) -> str:
    """The text of the card for ``config`` in ``folder``: its ``README.md`` brought up to date, else a new card.

    An existing card keeps its text: only its metadata and the generated part between the markers are updated,
    so notes a person added survive the next save or push. Nothing is written.

    Args:
        where: what the loading snippet passes to ``Patch.from_pretrained`` (default: the folder).

    Raises:
        PatchFormatError: the existing card is a link out of the folder or its metadata cannot be parsed.
    """
    fresh = build_model_card(config, where or Path(folder).as_posix())
    path = Path(folder) / CARD_NAME
    _check_links(Path(folder), [CARD_NAME])
    if not path.exists():
        return str(fresh)
    try:
        card = ModelCard.load(path)
    except (ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError is a ValueError; never overwrite such a card
        raise PatchFormatError(f"{path}: cannot read the model card's metadata ({exc}); fix or delete it") from None
    for key in ("library_name", "base_model", "base_model_relation"):
        card.data[key] = fresh.data.get(key) or card.data.get(key)
    tags = card.data.get("tags") or []
    card.data["tags"] = list(dict.fromkeys([*([tags] if isinstance(tags, str) else tags), *CARD_TAGS]))
    generated = _GENERATED.findall(fresh.text)[0]
    card.text = _GENERATED.sub(lambda _: generated, card.text, count=1)
    return str(card)


def _summary(config: PatchConfig) -> str:
    count = len(config.class_ids)
    return f"{count} class{'es' if count != 1 else ''} of {config.source.id or '?'} for {config.target.id or '?'}"


def _cell(value: Any) -> str:
    """A value made safe for one Markdown table cell."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ") or " "
