"""Load the classifiers pnc_surgery works on from a name: timm names, Hub ids and local folders.

:func:`load_model` is what ``pnc-surgery --source/--target`` and ``pnc_surgery.load_model(spec)`` use:

* ``"resnet18"``, ``"resnet18.a1_in1k"``: a timm architecture (random weights unless ``pretrained=True``).
* ``"timm/resnet18.a1_in1k"``, ``"hf-hub:timm/resnet18.a1_in1k"``: a timm model on the Hugging Face Hub.
* ``"google/vit-base-patch16-224"``: any other ``namespace/name`` is a Hub repo; its ``config.json`` says whether
  it is a timm model (an ``architecture`` field) or a transformers one (``architectures``).
* a local folder with a ``config.json`` in either format (a transformers ``save_pretrained`` folder, a timm
  ``push_to_hub`` folder, or a Hub cache snapshot).

Hub models come with their pretrained weights by default. Every file goes through the ``huggingface_hub`` cache
(``HF_HUB_CACHE``, ``cache_dir=``), so ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` works for anything cached.
Weights are read from ``model.safetensors`` only: no pickle, and no code from the repo
(``trust_remote_code`` stays off).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from .backends.timm import MODEL_KWARGS_ATTR
from .errors import InvalidInputError, UnsupportedModelError

__all__ = ["load_model"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_WEIGHTS = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


def load_model(
    spec: str,
    *,
    pretrained: bool | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """A timm or transformers classifier from a name, a Hub id or a folder, in eval mode.

    Args:
        spec: a timm architecture name, a Hub id (``namespace/name``, ``hf-hub:`` prefix allowed, ``@revision``
            suffix allowed) or a local folder with a ``config.json`` (see the module docstring).
        pretrained: load pretrained weights. Default: yes for Hub ids and folders, no for timm architecture names
            (their weights need the network unless cached).
        revision: branch, tag or commit of a Hub repo.
        cache_dir: the huggingface_hub cache to use (default ``HF_HUB_CACHE``).
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        local_files_only: use only the cache, never the network (``HF_HUB_OFFLINE=1`` does the same).
        **kwargs: keyword arguments of ``timm.create_model`` (``num_classes``, ``in_chans``, ``img_size``, ...) or
            config overrides of a transformers model (``num_labels``, ...).

    Returns:
        The model, in eval mode.

    Raises:
        InvalidInputError: the spec names nothing loadable, or a keyword argument is not one the model takes.
        UnsupportedModelError: the folder or repo holds no usable config or weights.
    """
    if not isinstance(spec, str) or not spec:
        raise InvalidInputError(f"a model spec is a non-empty string, got {spec!r}")
    hub = {"revision": revision, "cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
    folder = Path(spec)
    if folder.is_dir():
        model = _from_folder(folder, pretrained is not False, kwargs)
    elif spec.startswith("hf-hub:") or _HUB_ID.match(spec):
        model = _from_hub(spec.removeprefix("hf-hub:"), pretrained is not False, hub, kwargs)
    else:
        model = _timm_by_name(spec, bool(pretrained), kwargs)
    return model.eval()


def _read_config(path: Path, where: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"{where}: config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{where}: config.json is not a JSON object")
    return config


def _family(config: dict[str, Any], where: str) -> str:
    """``"timm"`` or ``"transformers"``, from the fields each library writes into ``config.json``."""
    if isinstance(config.get("architecture"), str):
        return "timm"
    if isinstance(config.get("architectures"), list) or isinstance(config.get("model_type"), str):
        return "transformers"
    raise UnsupportedModelError(
        f"{where}: config.json is neither a timm config ('architecture') nor a transformers one ('architectures')"
    )


def _from_folder(folder: Path, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise InvalidInputError(f"{folder} is a folder without a config.json: not a timm or transformers model")
    config = _read_config(folder / "config.json", str(folder))
    has_weights = any(folder.glob("*.safetensors"))
    if pretrained and not has_weights and any(f.suffix in _PICKLE_SUFFIXES for f in folder.iterdir()):
        raise UnsupportedModelError(
            f"{folder} holds its weights in a pickle file only; pnc_surgery reads safetensors (convert it with "
            "safetensors.torch.save_file, or pass pretrained=False for random weights)"
        )
    if _family(config, str(folder)) == "timm":
        return _timm_from_folder(folder, config, pretrained and (folder / _WEIGHTS).is_file(), kwargs)
    return _transformers(str(folder), config, pretrained and has_weights, {}, kwargs)


def _from_hub(repo: str, pretrained: bool, hub: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    repo, _, at = repo.partition("@")
    hub = {**hub, "revision": hub["revision"] or at or None}
    if not _HUB_ID.match(repo):
        raise InvalidInputError(f"{repo!r} is not a Hub model id (namespace/name)")
    config_path = _download(repo, "config.json", hub)
    config = _read_config(config_path, repo)
    if _family(config, repo) == "timm":
        if pretrained:
            _download(repo, _WEIGHTS, hub)  # next to config.json in the same cache snapshot
        model: Any = _timm_from_folder(config_path.parent, config, pretrained, kwargs)
        model.pretrained_cfg = {**model.pretrained_cfg, "hf_hub_id": repo, "source": "hf-hub"}  # the id a patch records
        return model
    return _transformers(repo, config, pretrained, hub, kwargs)


def _download(repo: str, filename: str, hub: dict[str, Any]) -> Path:
    """One file of a Hub repo through the huggingface_hub cache; errors are the library's own (network, offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, **hub))
    except LocalEntryNotFoundError as exc:  # the same error, saying which file of which repo
        raise LocalEntryNotFoundError(
            f"{repo}: {filename} is not in the Hub cache, and the Hub could not be asked (offline or unreachable)"
        ) from exc
    except RemoteEntryNotFoundError:
        raise UnsupportedModelError(f"Hub repo {repo} has no {filename}") from None


def _timm_by_name(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name.split(".", 1)[0]):
        raise InvalidInputError(
            f"{name!r} is neither a timm model name, a Hub id (namespace/name) nor a folder with a config.json"
        )
    return _create_timm(name, pretrained, kwargs, recorded=kwargs)


def _timm_from_folder(folder: Path, config: dict[str, Any], pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """A timm model from a folder holding timm's ``config.json`` (and ``model.safetensors`` when ``pretrained``)."""
    model_args: dict[str, Any] = config["model_args"] if isinstance(config.get("model_args"), dict) else {}
    recorded = {**model_args, **({"num_classes": config["num_classes"]} if "num_classes" in config else {}), **kwargs}
    if not pretrained:
        return _create_timm(config["architecture"], False, recorded, recorded)
    return _create_timm(f"local-dir:{folder}", True, kwargs, recorded)


def _create_timm(name: str, pretrained: bool, kwargs: dict[str, Any], recorded: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with its keyword errors turned into one clear message; records the rebuild kwargs."""
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise InvalidInputError(f"timm model {name!r} does not take these keyword arguments: {exc}") from None
    setattr(model, MODEL_KWARGS_ATTR, dict(recorded))
    return model


def _transformers(
    where: str, config: dict[str, Any], pretrained: bool, hub: dict[str, Any], kwargs: dict[str, Any]
) -> nn.Module:
    """A transformers classifier: the class named by ``architectures``, from the folder or repo ``where``."""
    import transformers

    names = config.get("architectures") or []
    cls = next((getattr(transformers, n) for n in names if isinstance(n, str) and hasattr(transformers, n)), None)
    if cls is None:
        raise UnsupportedModelError(f"{where}: config.json names no transformers model class in 'architectures'")
    options = {k: v for k, v in hub.items() if v not in (None, False)}
    try:
        model_config = transformers.AutoConfig.from_pretrained(where, **options)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # transformers reports a bad config as any of these
        raise UnsupportedModelError(f"{where}: transformers cannot read its config.json ({exc})") from None
    unknown = sorted(k for k in kwargs if not hasattr(model_config, k))
    if unknown:
        raise InvalidInputError(f"{type(model_config).__name__} has no fields {unknown}")
    for key, value in kwargs.items():
        setattr(model_config, key, value)
    if not pretrained:
        return cls(model_config)
    return cls.from_pretrained(where, config=model_config, use_safetensors=True, **options)
