"""Bind an :class:`~sae_hooks.intervene.SAEManager`'s API onto a model instance (no subclassing)."""

from __future__ import annotations

import functools
from typing import Any

from sae_hooks.intervene import SAEManager

#: The methods every adapter adds to the model it wraps.
BOUND_METHODS = ("add_sae", "remove_sae", "reset_saes", "saes")


def bind(model: Any, manager: SAEManager) -> None:
    model.__dict__["sae_manager"] = manager
    for name in BOUND_METHODS:
        model.__dict__[name] = getattr(manager, name)


def wrap_generation(model: Any, manager: SAEManager, names: tuple[str, ...] = ("generate",)) -> None:
    """Make ``model.generate`` (and friends) track absolute positions for position filters."""
    for name in names:
        original = getattr(model, name, None)
        if original is None or getattr(original, "_sae_hooks_wrapped", False):
            continue

        @functools.wraps(original)
        def generate(*args: Any, _original=original, **kwargs: Any) -> Any:
            with manager.generation():
                return _original(*args, **kwargs)

        generate._sae_hooks_wrapped = True  # type: ignore[attr-defined]
        model.__dict__[name] = generate
