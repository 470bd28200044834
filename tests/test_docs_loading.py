"""Run the ```python blocks of docs/loading.md (in order, in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "loading.md"


def test_loading_doc_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/loading.md has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "saelens" in out and "['blocks.3.hook_resid_pre', 'layer_4/width_16k/average_l0_20']" in out
    assert "jumprelu model.layers.4" in out
