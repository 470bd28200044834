"""``sae-hooks demo``: a first run prints progress, the metrics with what they mean, where the SAE and its
dashboard were written and what to run next -- and no library warnings."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_demo_prints_only_what_a_newcomer_needs_and_builds_a_dashboard(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "sae_hooks.app.cli", "demo", "--steps", "12", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # stderr holds progress bars only: no "[transformers]" notices, no warnings.
    for line in re.split(r"[\r\n]+", proc.stderr):
        assert not line.strip() or re.match(r"^[\w ]+: +(\d+%\||[\d.]+[kM]?\w* \[)", line.strip()), line  # tqdm lines
        assert "warn" not in line.lower() and "[transformers]" not in line, line
    text = proc.stdout
    for name in ("FVU", "L0", "dead latents", "CE loss recovered", "KL(clean || SAE)"):
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(name)]
        assert len(line.split("   ")[-1].split()) >= 3, line  # each metric comes with what it means
    assert f"{out / 'sae'}/" in text and f"{out / 'dashboard'}/index.html" in text
    assert "sae-hooks dashboard" in text and "Next:" in text
    from sae_hooks import load

    sae = load(str(out / "sae"))
    assert sae.cfg.d_sae == 512
    index = (out / "dashboard" / "data" / "index.js").read_text()
    assert '"d_sae":512' in index and (out / "dashboard" / "latent.html").is_file()
