"""Which on-disk format a folder (or a Hub sub-folder) holds, from the names of its files.

Rules, tried in this order (:data:`sae_hooks.hub.formats.FORMATS`); paths are relative to the SAE's folder:

1. ``sae_hooks`` (native): ``cfg.json`` + ``sae.safetensors`` and ``cfg.json`` has ``"format": "sae_hooks"``.
2. ``sparsify``: ``cfg.json`` + ``sae.safetensors`` and ``cfg.json`` is not ours.
3. ``saelens``: ``cfg.json`` + ``sae_weights.safetensors``.
4. ``gemma_scope_2``: ``params.safetensors`` (``config.json`` optional).
5. ``gemma_scope``: ``params.npz``.
6. ``llama_scope``: ``hyperparams.json`` + ``sae_weights.*`` or ``checkpoints/{pruned,final}.{safetensors,pt}``.
7. ``lm_saes``: ``config.json`` + ``sae_weights.safetensors`` (or ``.pt``).
8. ``dictionary_learning``: ``config.json`` + ``ae.pt``.
9. ``mlsae``: ``config.json`` + ``model.safetensors``.
10. ``openai``: exactly one ``*.pt`` and no ``cfg.json``/``config.json``/``hyperparams.json``.

Rules 1 and 2 share file names; they are told apart by reading ``cfg.json`` (``peek``). Any other overlap (a
folder with both ``params.npz`` and ``sae_weights.safetensors``, say) is ambiguous: :class:`AmbiguousFormatError`
lists the candidates, and ``format=`` picks one. No match: :class:`UnknownFormatError` lists the files seen.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SAEFormatError, did_you_mean
from .formats import ALIASES, BY_NAME, FORMATS, Format


class UnknownFormatError(SAEFormatError):
    """No known SAE format matches the files (the message lists them and the rules)."""


class AmbiguousFormatError(SAEFormatError):
    """Several formats match the files; pass ``format=`` (the message lists the candidates)."""


def format_by_name(name: str) -> Format:
    """The :class:`Format` called ``name`` (aliases such as ``"native"``, ``"sae_lens"`` accepted)."""
    key = ALIASES.get(name, name)
    if key not in BY_NAME:
        known = sorted(BY_NAME) + sorted(ALIASES)
        raise UnknownFormatError(f"unknown format {name!r}.{did_you_mean(name, known)} Known formats: {sorted(BY_NAME)}")
    return BY_NAME[key]


def candidates(files: list[str], peek: Callable[[str], dict[str, Any] | None] | None = None) -> list[Format]:
    """Every format whose rule matches ``files`` (relative paths), in rule order."""
    return [f for f in FORMATS if f.matches(files, peek)]


def detect_format(
    files: list[str],
    peek: Callable[[str], dict[str, Any] | None] | None = None,
    where: str = "<folder>",
    format: str | None = None,  # noqa: A002 - the public keyword
) -> Format:
    """The format of the SAE whose folder holds ``files``; ``format=`` overrides detection."""
    if format is not None:
        return format_by_name(format)
    found = candidates(files, peek)
    if len(found) == 1:
        return found[0]
    shown = sorted(files)[:30]
    if not found:
        rules = "; ".join(f"{f.name}: {f.rule}" for f in FORMATS)
        hint = _hint(files, peek)
        raise UnknownFormatError(f"{where}: no known SAE format matches the files {shown}."
                                 + (f" {hint}" if hint else "") + f" Rules: {rules}")
    names = [f.name for f in found]
    raise AmbiguousFormatError(
        f"{where}: the files {shown} match several formats {names}; pass format= one of {names}"
    )


def _hint(files: list[str], peek: Callable[[str], dict[str, Any] | None] | None) -> str:
    """What a near miss probably is (so the error says more than the rules)."""
    if "ae.pt" in files and "config.json" not in files:
        return ("ae.pt without config.json looks like a dictionary_learning dictionary whose config.json is missing "
                "(it names the dict_class); put it back beside ae.pt.")
    cfg = peek("config.json") if peek is not None and "config.json" in files else None
    if cfg and ("model_type" in cfg or "architectures" in cfg):
        return (f"config.json describes a transformers model (model_type {cfg.get('model_type')!r}), not an SAE: "
                "point at the SAE's folder.")
    return ""


def is_sae_folder(files: list[str]) -> bool:
    """Whether some format's file-name rule matches (without reading anything)."""
    return any(f.matches(files, None) for f in FORMATS)
