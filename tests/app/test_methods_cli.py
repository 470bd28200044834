"""The issue-11 methods train from the CLI on the embedded model (live), save natively, and resume."""

from __future__ import annotations

import pytest
import torch

from sae_hooks.native import load as load_native

pytest.importorskip("transformers")

COMMON = ["--site", "transformer.h.1", "--seq-len", "64", "--batch-size", "4", "--k", "8", "--d-sae", "256",
          "--batch-tokens", "128", "--buffer-tokens", "512", "--no-progress"]

CASES = {
    "feature_choice": ["--arch", "feature_choice", "--capacities", "zipf"],
    "mutual_choice": ["--arch", "mutual_choice", "--choice-aux", "zipf"],
    "matryoshka": ["--arch", "matryoshka", "--matryoshka-widths", "32", "128"],
    "pam": ["--arch", "signed_topk", "--optimizer", "pam-sgd", "--pam-round-steps", "3"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_trains_each_method_live_and_resumes(tmp_path, case) -> None:
    from sae_hooks.app.cli import main

    args = COMMON + CASES[case]
    ck = tmp_path / "ck"  # a checkpoint at step 5 of the 8-step run
    assert main(["train", *args, "--steps", "8", "--checkpoint-dir", str(ck), "--checkpoint-every", "5",
                 "--out", str(tmp_path / "full")]) == 0
    (name,) = [p.name for p in (tmp_path / "full").iterdir()]
    full = load_native(tmp_path / "full" / name)
    arch = CASES[case][1]
    assert full.cfg.architecture == arch
    meta = full.cfg.metadata["training"]
    assert meta["steps"] == 8 and meta["settings"]["optimizer"] == ("pam-sgd" if case == "pam" else "adam")
    if case == "matryoshka":
        assert full.cfg.matryoshka_widths == [32, 128, 256]
    # resumed from step 5 to 8: the same SAE
    assert main(["train", *args, "--steps", "8", "--resume", str(ck), "--out", str(tmp_path / "resumed")]) == 0
    resumed = load_native(tmp_path / "resumed" / name)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), (case, k)
