"""In-memory SAE objects of other libraries, converted on attach (duck-typed: nothing is imported).

A SAELens ``SAE`` object (``sae.cfg.to_dict()`` is what SAELens writes as ``cfg.json``, ``sae.state_dict()``
what it writes as ``sae_weights.safetensors``) goes through the same converter as a SAELens folder, so
every fold the file loader applies (thresholds, decoder-norm rescaling, norm scaling) applies here too.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_hooks.hub.formats import saelens
from sae_hooks.hub.formats._common import LoadOptions, build
from sae_hooks.saes import SAE


def looks_like_saelens(obj: Any) -> bool:
    cfg = getattr(obj, "cfg", None)
    state_dict = getattr(obj, "state_dict", None)
    return (not isinstance(obj, SAE) and callable(getattr(cfg, "to_dict", None)) and callable(state_dict)
            and hasattr(obj, "W_enc") and hasattr(obj, "W_dec"))


def convert_foreign(obj: Any) -> SAE | None:
    """An sae_hooks SAE with the weights of ``obj`` (a SAELens SAE), or ``None`` if ``obj`` is not one."""
    if not looks_like_saelens(obj):
        return None
    source = f"in-memory {type(obj).__name__}"
    cfg, flags = saelens.read_config(dict(obj.cfg.to_dict()), source)
    with torch.no_grad():
        state = {k: v.detach().clone() for k, v in obj.state_dict().items()}
    state = saelens.convert_state(state, cfg, flags, source)
    return build(cfg, state, source, LoadOptions())


__all__ = ["convert_foreign", "looks_like_saelens"]
