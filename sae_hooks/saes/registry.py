"""Architectures by name, and the names other libraries use for them."""

from __future__ import annotations

from typing import Any

from ..config import SAEConfig, Site
from ..errors import ConfigError, UnknownArchitectureError, did_you_mean
from .base import SAE
from .training import TrainingSpec

_REGISTRY: dict[str, type[SAE]] = {}
_SPECS: dict[str, TrainingSpec] = {}

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


def register_sae_class(
    cls: type[SAE], name: str | None = None, *, spec: TrainingSpec | None = None, replace: bool = False,
) -> type[SAE]:
    """Register an SAE class (and its :class:`~.training.TrainingSpec`, which makes it trainable) under
    ``name`` (default: ``cls.architecture``). A name already registered raises :class:`ConfigError`
    unless ``replace=True``."""
    name = name or cls.architecture
    if not name:
        raise ConfigError(f"{cls.__name__} has no architecture name: set cls.architecture or pass name=")
    if name in ALIASES:
        raise ConfigError(f"{name!r} is an alias of {ALIASES[name][0]!r}; register under another name")
    if name in _REGISTRY and not replace:
        raise ConfigError(
            f"architecture {name!r} is already registered ({_REGISTRY[name].__name__}); pass replace=True to replace it"
        )
    if spec is not None and not isinstance(spec, TrainingSpec):
        raise ConfigError(f"spec must be a TrainingSpec instance, got {type(spec).__name__}")
    _REGISTRY[name] = cls
    if spec is not None:
        _SPECS[name] = spec
    else:
        _SPECS.pop(name, None)
    return cls


def training_spec(architecture: str) -> TrainingSpec:
    """The training spec registered for ``architecture``; :class:`ConfigError` if it is inference-only."""
    name = ALIASES.get(architecture, (architecture, {}))[0]
    sae_class(name)  # unknown names: UnknownArchitectureError with suggestions
    if name not in _SPECS:
        raise ConfigError(
            f"architecture {architecture!r} has no training spec (inference only); trainable: {trainable_architectures()}"
        )
    return _SPECS[name]


def trainable_architectures() -> list[str]:
    """Registered names with a training spec (the CLI's ``--arch`` choices)."""
    return sorted(_SPECS)


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
    """Convenience constructor: ``make_sae("topk", 512, 4096, k=32, sites="blocks.3.hook_resid_post")``.

    ``sites`` is one site (a string or :class:`~sae_hooks.config.Site`) or a list of them."""
    sites = config.get("sites")
    if isinstance(sites, (str, Site, dict)):
        config["sites"] = [sites]
    return build_sae(SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, **config))
