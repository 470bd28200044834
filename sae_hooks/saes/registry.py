"""Architectures by name, and the names other libraries use for them."""

from __future__ import annotations

from typing import Any

from ..config import SAEConfig
from ..errors import UnknownArchitectureError, did_you_mean
from .base import SAE

_REGISTRY: dict[str, type[SAE]] = {}

#: Names used by SAELens and others -> (our architecture, config overrides). A transcoder is any
#: architecture with ``d_out`` (and usually a different output site); ``skip`` adds ``W_skip``.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("relu", {}),
    "transcoder": ("relu", {}),
    "skip_transcoder": ("relu", {"skip": True}),
    "jumprelu_transcoder": ("jumprelu", {}),
    "jumprelu_skip_transcoder": ("jumprelu", {"skip": True}),
    "topk_transcoder": ("topk", {}),
    "topk_skip_transcoder": ("topk", {"skip": True}),
}


def register_sae_class(cls: type[SAE], name: str | None = None) -> type[SAE]:
    """Register an SAE class under ``name`` (default: ``cls.architecture``). Usable as a decorator."""
    _REGISTRY[name or cls.architecture] = cls
    return cls


def sae_class(architecture: str) -> type[SAE]:
    """The class registered for ``architecture`` (aliases resolved)."""
    name = ALIASES.get(architecture, (architecture, {}))[0]
    if name not in _REGISTRY:
        known = sorted(_REGISTRY) + sorted(ALIASES)
        raise UnknownArchitectureError(
            f"unknown SAE architecture {architecture!r}.{did_you_mean(architecture, known)} "
            f"Registered: {sorted(_REGISTRY)} (aliases: {sorted(ALIASES)})"
        )
    return _REGISTRY[name]


def registered_architectures() -> list[str]:
    return sorted(_REGISTRY)


def build_sae(cfg: SAEConfig) -> SAE:
    """Instantiate the SAE class that ``cfg.architecture`` names (weights freshly initialised)."""
    name, overrides = ALIASES.get(cfg.architecture, (cfg.architecture, {}))
    if name != cfg.architecture or overrides:
        cfg = cfg.replace(architecture=name, **overrides)
    return sae_class(name)(cfg)


def make_sae(architecture: str, d_in: int, d_sae: int, **config: Any) -> SAE:
    """Convenience constructor: ``make_sae("topk", 512, 4096, k=32, sites=["blocks.3.hook_resid_post"])``."""
    return build_sae(SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, **config))
