"""``import sae_hooks`` must not import TransformerLens or nnsight (design.md's dependency rule)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parents[1] / "sae_hooks"


def test_import_pulls_in_no_framework():
    code = (
        "import sys, sae_hooks, sae_hooks.adapters\n"
        "import sae_hooks.saes, sae_hooks.native, sae_hooks.intervene, sae_hooks.sites\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformer_lens', 'nnsight', 'transformers'))\n"
        "print(bad); assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_source_never_names_a_framework_import():
    """No import statement anywhere in the core, not even a lazy one inside a function."""
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] in ("transformer_lens", "nnsight") for name in names):
                offenders.append(f"{path}:{node.lineno}")
    assert not offenders, offenders
