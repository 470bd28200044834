"""Bind an :class:`~sae_hooks.intervene.SAEManager`'s API onto a model instance (no subclassing)."""

from __future__ import annotations

import functools
from typing import Any

from sae_hooks.errors import SAEHooksError
from sae_hooks.intervene import SAEManager

#: The methods every adapter adds to the model it wraps.
BOUND_METHODS = ("add_sae", "remove_sae", "reset_saes", "saes", "run_with_saes", "run_with_cache_with_saes")


def bind(model: Any, manager: SAEManager, deepcopy: Any = None) -> None:
    """Put the manager's API on ``model``. Pickling an attached model raises a typed error (it holds live
    hooks and closures); ``deepcopy`` (a ``memo -> copy`` function) makes ``copy.deepcopy`` give an
    independent attached copy, else deep copies are refused the same way."""
    model.__dict__["sae_manager"] = manager
    for name in BOUND_METHODS:
        model.__dict__[name] = getattr(manager, name)
    kind = type(model).__name__
    model.__dict__["__reduce_ex__"] = functools.partial(_refuse, kind, "pickled")
    model.__dict__["__deepcopy__"] = deepcopy or functools.partial(_refuse, kind, "deep-copied")


#: Instance attributes the adapters add (removed by ``detach``; kept out of copies).
OWN_KEYS = (*BOUND_METHODS, "sae_manager", "sae_capture", "sae_taps", "generate", "run_with_cache",
            "reset_hooks", "remove_all_hook_fns", "__reduce_ex__", "__deepcopy__")


def _refuse(kind: str, what: str, *args: Any) -> Any:
    raise SAEHooksError(
        f"this {kind} has SAEs attached through live hooks and cannot be {what}; "
        "remove the adapter first (detach(model), or model.reset_saes() and copy the SAEs separately), "
        "then attach again on the copy"
    )


def wrap_generation(
    model: Any, manager: SAEManager, names: tuple[str, ...] = ("generate",), check: Any = None
) -> None:
    """Make ``model.generate`` (and friends) track absolute positions for position filters; ``check`` is
    called with the call's keyword arguments first (e.g. to warn about a known upstream defect)."""
    for name in names:
        original = getattr(model, name, None)
        if original is None or getattr(original, "_sae_hooks_wrapped", False):
            continue

        @functools.wraps(original)
        def generate(*args: Any, _original=original, **kwargs: Any) -> Any:
            if check is not None:
                check(kwargs)
            with manager.generation():
                return _original(*args, **kwargs)

        generate._sae_hooks_wrapped = True  # type: ignore[attr-defined]
        model.__dict__[name] = generate
