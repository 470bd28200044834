"""The newer OpenMOSS layout (config.json + sae_weights.safetensors, W_E/W_D, activation_function.log_jumprelu_threshold,
dataset norms as tensors) against llamascopium 2.0.0b34 itself: fixtures written by its save_pretrained, golden outputs
from its from_pretrained (default: normalize -> encode -> decode -> denormalize; and fold_activation_scale=True)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_hooks
from sae_hooks.errors import ConfigError, UnknownArchitectureError

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "lm_saes_new"
NAMES = sorted(json.loads((ROOT / "manifest.json").read_text())["fixtures"])
ATOL = 2e-5


def _decoder_norms(name: str, folded: bool) -> torch.Tensor:
    w = load_file(str(ROOT / name / "sae_weights.safetensors"))
    cfg = json.loads((ROOT / name / "config.json").read_text())
    n = w["W_D"].norm(dim=1)
    if folded:
        norm_in = float(w[f"dataset_average_activation_norm.{cfg['hook_point_in']}"])
        norm_out = float(w[f"dataset_average_activation_norm.{cfg['hook_point_out']}"])
        n = n * norm_out / norm_in  # s_in / s_out
    return n


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("convention", ["authors", "folded"])
def test_matches_the_authors_code(name, convention):
    g = load_file(str(ROOT / name / "golden.safetensors"))
    sae = sae_hooks.load(ROOT / name, convention=None if convention == "authors" else convention)
    assert sae.cfg.metadata["source_format"] == "lm_saes" and sae.cfg.metadata["convention"] == convention
    lat_key, rec_key = ("latents_unfolded", "recon_unfolded") if convention == "authors" else ("latents", "recon")
    lat = sae.encode(g["x"])
    expect = g[lat_key]
    if sae.cfg.architecture == "topk":  # TopK latents come out multiplied by the decoder norm (documented)
        expect = expect * _decoder_norms(name, convention == "folded")
    torch.testing.assert_close(lat, expect, atol=ATOL, rtol=1e-6)  # TopK latents reach ~250 here
    torch.testing.assert_close(sae(g["x"]), g[rec_key], atol=ATOL, rtol=0)


def test_fold_changes_which_jumprelu_latents_fire():
    # The authors' two paths disagree for JumpReLU (the threshold is not rescaled by the fold): both are offered.
    g = load_file(str(ROOT / "jumprelu_sae" / "golden.safetensors"))
    assert (g["recon"] - g["recon_unfolded"]).abs().max() > 0.1


def test_sites_and_transcoder():
    tc = sae_hooks.load(ROOT / "jumprelu_transcoder")
    assert tc.cfg.sites[0].hook == "blocks.3.ln2.hook_normalized"
    assert tc.cfg.sites[0].hook_out == "blocks.3.hook_mlp_out"


def test_linear_key_names_of_older_files(tmp_path):
    # Llama Scope R1-era files: encoder.weight / decoder.weight (nn.Linear) and a top-level log_jumprelu_threshold.
    src = ROOT / "jumprelu_sae"
    folder = tmp_path / "r1"
    folder.mkdir()
    shutil.copy(src / "config.json", folder)
    w = load_file(str(src / "sae_weights.safetensors"))
    renamed = {"encoder.weight": w.pop("W_E").T.contiguous(), "encoder.bias": w.pop("b_E"),
               "decoder.weight": w.pop("W_D").T.contiguous(), "decoder.bias": w.pop("b_D"),
               "log_jumprelu_threshold": w.pop("activation_function.log_jumprelu_threshold"), **w}
    save_file(renamed, str(folder / "sae_weights.safetensors"))
    g = load_file(str(src / "golden.safetensors"))
    torch.testing.assert_close(sae_hooks.load(folder).encode(g["x"]), g["latents_unfolded"], atol=ATOL, rtol=0)


def test_multi_site_types_and_bad_convention_refused(tmp_path):
    folder = tmp_path / "clt"
    shutil.copytree(ROOT / "jumprelu_sae", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "sae_type": "clt"}))
    with pytest.raises(UnknownArchitectureError, match="'clt'"):
        sae_hooks.load(folder)
    with pytest.raises(ConfigError, match="saelens"):
        sae_hooks.load(ROOT / "jumprelu_sae", convention="saelens")
