"""Every ```python block in README.md and docs/*.md runs (each file's blocks in order, as one script).

The blocks run as a real file in a subprocess (nnsight re-reads a trace's source from disk) in a
temporary working directory, so examples that write files leave nothing behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: What some examples must print (their own asserts check the rest).
EXPECTED_OUTPUT = {
    "loading.md": [
        "saelens",
        "['blocks.3.hook_resid_pre', 'layer_4/width_16k/average_l0_20']",
        "jumprelu model.layers.4",
    ],
}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=lambda p: p.name)
def test_doc_examples_run(doc, tmp_path):
    blocks = python_blocks(doc)
    if not blocks:
        pytest.skip(f"{doc.name} has no python example")
    script = tmp_path / f"{doc.stem}_example.py"
    script.write_text("\n\n".join(blocks))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")},
    )
    assert result.returncode == 0, f"{doc.name} example failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    for expected in EXPECTED_OUTPUT.get(doc.name, []):
        assert expected in result.stdout, f"{doc.name}: {expected!r} not printed:\n{result.stdout[-3000:]}"
