"""``import sae_hooks`` must not import TransformerLens or nnsight (design.md's dependency rule)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parents[1] / "sae_hooks"


def test_import_pulls_in_no_framework():
    code = (
        "import sys, sae_hooks, sae_hooks.adapters\n"
        "import sae_hooks.saes, sae_hooks.native, sae_hooks.interventions, sae_hooks.attach\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformer_lens', 'nnsight', 'transformers'))\n"
        "print(bad); assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_source_never_names_a_framework_import():
    offenders = []
    for path in CORE.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and any(
                fw in stripped.split()[1].split(".")[0] for fw in ("transformer_lens", "nnsight")
            ):
                offenders.append(f"{path}:{n}: {stripped}")
    assert not offenders, offenders
