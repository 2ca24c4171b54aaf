"""The patch: cloned classes for a target, an ``nn.Module`` that attaches through hooks and saves as safetensors + JSON.

Modules, in the order a patch lives through them:

* :mod:`.config`: the file format as typed dataclasses (:class:`PatchConfig`), and the one validator of files;
* :mod:`.build`: making a patch from live models (``Patch.from_parts``, ``Patch.assemble``);
* :mod:`.hooks`: attaching to a target and what is checked first; :mod:`.labels`: label names while attached;
* :mod:`.serialization`: reading, writing and rebuilding patch files;
* :mod:`.module`: :class:`Patch`, the public front over all of them (Hub methods through ``huggingface_hub``).
"""

from .build import target_fingerprint
from .config import FORMAT_VERSION, PatchConfig
from .module import Patch

__all__ = ["FORMAT_VERSION", "Patch", "PatchConfig", "target_fingerprint"]
