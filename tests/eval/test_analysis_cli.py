"""The analysis subcommands end to end on the embedded model: mdl, compare, amortisation."""

from __future__ import annotations

import json

import pytest
import torch

from sae_hooks import make_sae

pytest.importorskip("transformers")


def _saved(tmp_path, name, seed=0, perm=None, base=None):
    torch.manual_seed(seed)
    sae = make_sae("topk", 128, 256, k=8, sites=["transformer.h.1"])
    if base is not None:
        with torch.no_grad():
            sae.W_dec.copy_(base.W_dec[perm])
            sae.W_enc.copy_(base.W_enc[:, perm])
    sae.save(tmp_path / name)
    return sae


def test_cli_compare(tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    from sae_hooks.app.cli import main

    a = _saved(tmp_path, "a")
    perm = torch.randperm(256)
    _saved(tmp_path, "b", perm=perm, base=a)
    _saved(tmp_path, "c", seed=5)
    assert main(["compare", str(tmp_path / "b"), str(tmp_path / "a"), "--no-progress", "--out", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["shared_fraction"] == 1.0 and summary["orphans_a"] == 0
    assert torch.equal(load_file(tmp_path / "m.safetensors")["partner"], perm)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c"), "--no-progress"]) == 0
    assert "0 of 256 latents shared" in capsys.readouterr().out


def test_cli_mdl_and_amortisation(tmp_path, capsys) -> None:
    from sae_hooks.app.cli import main

    _saved(tmp_path, "a")
    common = ["--seq-len", "32", "--batch-size", "4", "--batches", "1"]
    assert main(["mdl", str(tmp_path / "a"), *common, "--tolerance", "0.05"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out[: out.rindex("}") + 1])
    assert r["l0"] == pytest.approx(8.0) and 0 < r["entropy_bits"] <= r["bound_bits"] and r["dense_bits"] > 0
    assert r["fvu_quantized"] - r["fvu"] <= 0.05
    assert main(["amortisation", str(tmp_path / "a"), *common]) == 0
    table = capsys.readouterr().out
    assert "| SAE |" in table and "SAE + OMP (k=8)" in table and "ce_loss_score" in table
    assert main(["amortisation", "--synthetic", "--steps", "30", "--json"]) == 0
    assert "SAE + ITO" in capsys.readouterr().out


def test_cli_compare_reads_foreign_formats(capsys) -> None:
    """A SAELens-format SAE (golden fixture written by SAELens) matched with itself: all shared."""
    from pathlib import Path

    from sae_hooks.app.cli import main

    path = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "saelens" / "jumprelu"
    assert main(["compare", str(path), str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    s = json.loads(out[: out.rindex("}") + 1])
    assert s["shared_fraction"] == 1.0 and s["mean_decoder_cos"] == pytest.approx(1.0, abs=1e-5)
