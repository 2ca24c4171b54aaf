"""Patch: the public front. A thin ``nn.Module`` holding branch, adapter and gate, with its config, attach/detach,
and save/load/Hub methods that delegate to :mod:`.build`, :mod:`.hooks`, :mod:`.serialization` and
:mod:`pnc_surgery.hub`.

While attached, ``target(x)`` returns the target's own logits followed by the cloned classes' logits (a tensor
for timm models, the same ``ModelOutput`` with wider ``logits`` for transformers models). The patch is never
registered as a submodule of the target, so the target's ``state_dict()``, parameters and buffers are untouched;
detaching removes the hooks and the target is exactly the model it was. The patch keeps its own precision: a
target in another dtype has its features cast for the patch and the patch's scores cast back.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from torch import nn

from ..branch import Branch
from ..errors import InvalidInputError, PatchFormatError, PatchStateError
from ..evidence import patch_gate_inputs
from ..gate import Gate
from . import build, labels, serialization
from .config import FORMAT_VERSION, PatchConfig
from .hooks import Attachment, check_fits, drop_dead_captures

if TYPE_CHECKING:
    from ..adapters import Adapter

__all__ = ["Patch"]


class Patch(nn.Module, ModelHubMixin):  # the card (library_name, tags) comes from generate_model_card
    """Cloned classes for a target model: branch + adapter + gate + config.

    Make one with :func:`pnc_surgery.clone` (learned), :meth:`from_parts` or :meth:`assemble` (by hand); load one
    with :meth:`from_pretrained` or :meth:`load`.

    Args:
        branch: the source tail (pruned, with the cloned classes' head rows).
        adapter: target feature at the insertion point -> branch input.
        gate: how the cloned scores compete with the target's.
        config: the patch's config; its ``adapter`` / ``branch`` / ``gate`` fields are read from the live modules
            whenever :attr:`config` is read.
    """

    branch: Branch
    adapter: Adapter
    gate: Gate

    def __init__(self, branch: Branch, adapter: Adapter, gate: Gate, config: PatchConfig) -> None:
        super().__init__()
        self.branch, self.adapter, self.gate = branch, adapter, gate
        self._config = config
        self.metrics: dict[str, Any] = dict(config.metrics)
        self._attachment: Attachment | None = None
        self._hub_mixin_config = None  # the mixin's own config.json is never written: the patch has its own file

    def __deepcopy__(self, memo: dict) -> Patch:
        """A copy; copied alone (not as part of a copy of the model it is attached to) it comes out detached."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        if new._attachment is None:
            drop_dead_captures(new)
        return new

    # ------------------------------------------------------------------ construction
    from_parts = classmethod(build.from_parts)
    assemble = classmethod(build.assemble)

    # ------------------------------------------------------------------ description
    @property
    def config(self) -> PatchConfig:
        """The config :meth:`save_pretrained` writes (module shapes and metrics as they are now)."""
        return replace(
            self._config,
            **build.module_specs(self.branch, self.adapter, self.gate),
            metrics=dict(self.metrics),
            num_parameters=self.num_parameters,
            format_version=FORMAT_VERSION,
        )

    def update_config(self, **changes: Any) -> None:
        """Replace fields of the config (``search=``, ``clone_config=``: what ``clone`` records)."""
        self._config = replace(self._config, **changes)

    @property
    def class_ids(self) -> list[int]:
        """Source class ids of the cloned classes, in output order."""
        return list(self._config.class_ids)

    @property
    def class_names(self) -> list[str]:
        """Names of the cloned classes, in output order."""
        return list(self._config.class_names)

    @property
    def num_parameters(self) -> int:
        """Parameters the patch adds to the target."""
        return sum(p.numel() for p in self.parameters())

    @property
    def is_attached(self) -> bool:
        return self._attachment is not None

    @property
    def _model(self) -> nn.Module | None:
        """The target this patch is attached to (kept outside the module tree: never moved, saved or counted)."""
        return None if self._attachment is None else self._attachment.model

    def labels(self, target: nn.Module) -> list[str]:
        """Names of ``target``'s outputs with this patch attached: the target's own classes, then the cloned ones."""
        own = labels.target_labels(target, self._config.target.num_classes)
        return own + labels.unique_names(self.class_names, own)

    def summary(self) -> str:
        """A few lines saying what this patch is and where it stands."""
        config = self._config
        state = f"attached to {type(self._model).__name__}" if self._model is not None else "detached"
        lines = [
            f"Patch ({state}): {len(config.class_ids)} classes {list(config.class_names)[:20]} from {config.source.id}",
            (
                f"  cut {config.cut.name} {tuple(config.cut.shape)} -> insertion {config.insertion.name} "
                f"{tuple(config.insertion.shape)} of {config.target.id}"
            ),
            f"  {self.num_parameters:,} parameters, gate {self.gate.kind}",
        ]
        if self.metrics:
            lines.append("  metrics: " + ", ".join(f"{k}={_short(v)}" for k, v in self.metrics.items()))
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return (
            f"classes={self.class_names[:20]}, cut={self._config.cut.name!r}, insertion={self._config.insertion.name!r}"
        )

    # ------------------------------------------------------------------ attach / detach
    def check(self, model: nn.Module, strict: bool = True) -> None:
        """Raise :class:`PatchMismatchError` if this patch does not fit ``model`` (nothing is changed)."""
        check_fits(self._config, model, strict=strict)

    def attach(self, model: nn.Module, strict: bool = True) -> nn.Module:
        """Hook this patch into ``model``; returns ``model``, whose outputs now include the cloned classes.

        Args:
            model: the target (its parameters, buffers and ``state_dict`` stay untouched).
            strict: refuse a model whose id, class or weights differ from the ones the patch was made for (with
                ``False``, a warning); shapes are always checked.
        """
        if self._attachment is not None:
            raise PatchStateError(
                f"this patch is already attached to a {type(self._model).__name__}; detach() it first"
            )
        self.check(model, strict=strict)
        try:
            serialization.check_finite(dict(self.named_parameters()), "cannot attach a patch with")
        except PatchFormatError as exc:
            raise PatchStateError(str(exc)) from None
        attachment = Attachment(self, model)
        attachment.install()
        self._attachment = attachment
        try:
            labels.refresh(model, self._config.target.num_classes)
        except BaseException:
            self.detach()
            raise
        return model

    def detach(self) -> nn.Module | None:
        """Remove every hook (and the label names attach added); the model is exactly what it was. Safe to call twice.

        Returns:
            The model it was attached to, or ``None``.
        """
        attachment, self._attachment = self._attachment, None
        if attachment is None:
            return None
        attachment.remove()
        labels.refresh(attachment.model, self._config.target.num_classes)
        return attachment.model

    @contextmanager
    def attached(self, model: nn.Module, strict: bool = True) -> Iterator[nn.Module]:
        """``with patch.attached(model): model(x)`` attaches for the block and always detaches."""
        self.attach(model, strict=strict)
        try:
            yield model
        finally:
            self.detach()

    def receive(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` from the target, on the patch's device (the patch follows the target there) in the patch's dtype."""
        weight = self.adapter.proj.weight
        if weight.device != x.device:
            self.to(x.device)
        return x.to(weight.dtype) if x.is_floating_point() else x

    def forward(
        self, feature: torch.Tensor, target_logits: torch.Tensor, pre_logits: torch.Tensor, **context: torch.Tensor
    ) -> torch.Tensor:
        """Cloned-class logits from the target's insertion feature, logits and pre-logits (what the hooks compute)."""
        return self.gate(*patch_gate_inputs(self, feature, target_logits, pre_logits, **context))

    # ------------------------------------------------------------------ files
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer (non-persistent ones too), as the file stores them."""
        named: dict[str, torch.Tensor] = dict(self.named_parameters(remove_duplicate=False))
        named.update(self.named_buffers(remove_duplicate=False))
        return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in named.items()}

    def _file_parts(self) -> tuple[dict[str, torch.Tensor], PatchConfig]:
        tensors = self.tensors()
        return tensors, replace(self.config, tensors_sha256=serialization.tensors_digest(tensors))

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | Path, *, push_to_hub: bool = False, repo_id: str | None = None, **push_kwargs: Any
    ) -> Path:
        """Write ``patch_config.json``, ``patch_model.safetensors`` and a ``README.md`` model card to a folder.

        The save is all-or-nothing (see :mod:`.serialization`); an existing card keeps the text a person wrote.

        Args:
            save_directory: the folder (created if needed; other files in it are left alone).
            push_to_hub: also push the folder to ``repo_id`` (keyword arguments as for :meth:`push_to_hub`).
        """
        folder = serialization.check_folder_path(save_directory)
        if push_to_hub and not repo_id:
            raise InvalidInputError("push_to_hub=True needs repo_id")
        self._save_pretrained(folder)
        if push_to_hub:
            from .. import hub

            hub.push_folder(folder, str(repo_id), **push_kwargs)
        return folder

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's save step: everything is checked and encoded before the folder is touched."""
        from .. import hub

        tensors, config = self._file_parts()
        weights = serialization.tensor_bytes(tensors, {"format": "pt"})
        card = hub.card_for_folder(save_directory, config)
        text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
        serialization.write_folder(
            save_directory,
            {
                serialization.WEIGHTS_NAME: weights,
                serialization.CONFIG_NAME: text.encode(),
                serialization.CARD_NAME: card.encode(),
            },
        )

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
    ) -> str:
        """Upload the patch to a Hugging Face Hub model repo in one commit, creating the repo if needed.

        Only the patch files go up; the repo's model card keeps its text (metadata and generated part updated).

        Args:
            repo_id: ``"namespace/name"`` of the model repo.
            private: visibility of a repo this call creates (an existing repo keeps its own).
            token: Hub token with write access (default: the logged-in one).
            revision: branch to commit to (created from ``main`` if missing), or the base of the pull request.
            create_pr: open a pull request instead of committing to ``revision``.
            commit_message: summary of the commit (a default names the classes and models).

        Returns:
            The URL of the pull request when ``create_pr``, else of the commit.
        """
        from .. import hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return hub.push_folder(
                Path(tmp),
                repo_id,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message,
            )

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        repo_id_or_dir: str | Path,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> Patch:
        """Load a patch from a local folder or a Hub repo (safetensors + JSON only; no code runs).

        A local directory wins over a Hub repo of the same name, as in ``transformers``.

        Args:
            repo_id_or_dir: a folder written by :meth:`save_pretrained` or a Hub repo id (``"user/name"``).
            revision: branch, tag or commit of the Hub repo (default ``main``); ignored for a local folder.
            subfolder: folder inside the repo or directory that holds the patch; must stay inside it.
            token: Hub token for private or gated repos (default: the logged-in one).
            cache_dir: Hub cache to use instead of ``HF_HUB_CACHE``.
            local_files_only: never touch the network; use the cache only.
            force_download: download again even if the files are cached.
        """
        from .. import hub

        folder = hub.resolve_patch_folder(
            repo_id_or_dir,
            revision=revision,
            subfolder=subfolder,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
        config = serialization.read_config(folder / serialization.CONFIG_NAME)
        tensors, _ = serialization.read_tensors(folder / serialization.WEIGHTS_NAME)
        return serialization.rebuild(cls, config, tensors, str(folder))

    @classmethod
    def _from_pretrained(cls, *, model_id: str | Path, **options: Any) -> Patch:
        """The mixin's load step: :meth:`from_pretrained` with the options it knows."""
        known = ("revision", "subfolder", "token", "cache_dir", "local_files_only", "force_download")
        return cls.from_pretrained(model_id, **{k: v for k, v in options.items() if k in known})

    def generate_model_card(self, repo_id_or_dir: str = "<repo_or_dir>") -> ModelCard:
        """The mixin's card step: this patch's model card, as :meth:`save_pretrained` writes it to a new folder.

        Args:
            repo_id_or_dir: what the card's loading snippet passes to :meth:`from_pretrained`.
        """
        from .. import hub

        return hub.build_model_card(self.config, repo_id_or_dir)

    def save(self, path: str | Path) -> Path:
        """Single-file form: tensors in safetensors, the config in its metadata (replaced in one step)."""
        tensors, config = self._file_parts()
        return serialization.write_single_file(path, tensors, config.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Load the single-file form written by :meth:`save`."""
        tensors, metadata = serialization.read_tensors(path)
        if serialization.METADATA_KEY not in metadata:
            raise PatchFormatError(
                f"{path}: no '{serialization.METADATA_KEY}' in the safetensors metadata; not a single-file patch"
            )
        data = serialization.decode_json(metadata[serialization.METADATA_KEY], str(path))
        return serialization.rebuild(cls, PatchConfig.from_dict(data, str(path)), tensors, str(path))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
