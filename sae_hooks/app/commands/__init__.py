"""One module per extra ``sae-hooks`` subcommand.

Each module defines ``register(subparsers) -> None``, which adds its parser and sets ``fn`` (a function
of the parsed arguments returning the exit code). :func:`sae_hooks.app.cli.build_parser` finds the
modules here by name, so adding a command touches no other file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def register_all(subparsers: Any) -> None:
    """Call every command module's ``register`` in name order."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
