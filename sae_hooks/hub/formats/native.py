"""Our own format (:mod:`sae_hooks.native`): ``cfg.json`` with ``"format": "sae_hooks"`` + ``sae.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ... import native as _native
from ...saes import SAE
from ._common import LoadOptions

NAME = "sae_hooks"
CONFIG = _native.CONFIG_FILE
WEIGHTS = _native.WEIGHTS_FILE


def detect(files: list[str], peek: Callable[[str], dict[str, Any] | None] | None = None) -> bool:
    """``cfg.json`` + ``sae.safetensors`` and ``cfg.json`` says ``"format": "sae_hooks"``.

    Without ``peek`` (no way to read the config) the file names alone count as a match; sparsify uses the same
    two names, so :func:`sae_hooks.hub.detect.detect_format` always passes ``peek``.
    """
    if not (CONFIG in files and WEIGHTS in files):
        return False
    if peek is None:
        return True
    return looks_native(peek(CONFIG))


def looks_native(cfg: Any) -> bool:
    """Ours: ``"format": "sae_hooks"``, or the key lost but our keys there (then the native reader says
    what is missing, instead of another format complaining about tensor names)."""
    if not isinstance(cfg, dict):
        return False
    if "format" in cfg:
        return cfg["format"] == NAME
    return "format_version" in cfg or {"architecture", "d_in", "d_sae", "sites"} <= cfg.keys()


def needed(files: list[str]) -> list[str]:
    return [CONFIG, WEIGHTS]


def load(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    sae = _native.load(folder, device=opts.device, dtype=opts.dtype)
    if opts.hook and not sae.cfg.sites:
        from ._common import make_site

        sae.cfg.sites = [make_site(opts.hook, opts.hook_out, sae.cfg.model_name)]
    return sae

