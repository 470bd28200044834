"""Every subpackage of sae_hooks is declared in pyproject.toml, so a regular (non-editable) install
ships it: setuptools installs only the packages listed there."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert len(config["packages"]) == len(set(config["packages"])), "a package is declared twice"
    declared = set(config["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "sae_hooks").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    adapters = {"sae_hooks.adapters"} if (ROOT / "adapters" / "__init__.py").exists() else set()
    assert on_disk | adapters <= declared, f"not declared in pyproject.toml: {sorted(on_disk - declared)}"
    assert config["package-dir"]["sae_hooks.adapters"] == "adapters"
