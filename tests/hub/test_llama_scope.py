"""Llama Scope against the authors' own loader: fixtures written by lm-saes 0.1 at the Llama Scope release commit
(``scripts/make_lmsaes_fixtures.py``), whose golden outputs are ``SparseAutoEncoder.from_pretrained(...)``'s
``encode``/``decode``/``forward``. Decoder column norms are 0.5-2, so skipping the authors' unit-norm step shows."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae_hooks
from sae_hooks.errors import ConfigError, SAEFormatError

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "lm_saes"
NAMES = sorted(json.loads((ROOT / "manifest.json").read_text())["fixtures"])
ATOL = 2e-5


def golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(ROOT / name / "golden.safetensors"))


@pytest.mark.parametrize("name", NAMES)
def test_matches_the_authors_loader(name):
    g = golden(name)
    sae = sae_hooks.load(ROOT / name)
    assert sae.cfg.metadata["source_format"] == "llama_scope" and sae.cfg.metadata["convention"] == "authors"
    lat = sae.encode(g["x"])
    torch.testing.assert_close(lat, g["latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(sae.decode(g["latents"]), g["decoded"], atol=ATOL, rtol=0)
    torch.testing.assert_close(sae(g["x"]), g["recon"], atol=ATOL, rtol=0)
    assert ((g["latents"] != 0) == (lat != 0)).all()  # the same latents fire


def test_pruned_checkpoint_is_preferred():
    sae = sae_hooks.load(ROOT / "topk_pruned")
    assert sae.cfg.metadata["checkpoint"] == "checkpoints/pruned.safetensors"
    hp = json.loads((ROOT / "topk_pruned" / "hyperparams.json").read_text())
    assert sae.cfg.apply_b_dec_to_input is hp["apply_decoder_bias_to_pre_encoder"] is True


def test_defaults_are_the_authors():
    # hyperparams.json without apply_decoder_bias_to_pre_encoder / act_fn: lm-saes defaults (True / relu).
    sae = sae_hooks.load(ROOT / "relu_defaults")
    assert sae.cfg.architecture == "relu" and sae.cfg.apply_b_dec_to_input is True


def test_topk_with_threshold_stays_topk_as_the_authors_compute_it():
    # lm-saes prints "Converting topk activation to jumprelu" but its activation function is already built: L0 = k.
    g = golden("topk_to_jumprelu")
    assert ((g["latents"] != 0).sum(-1) == 3).all()
    assert sae_hooks.load(ROOT / "topk_to_jumprelu").cfg.architecture == "topk"
    assert sae_hooks.load(ROOT / "topk_to_jumprelu", convention="saelens").cfg.architecture == "jumprelu"


def test_transcoder_sites():
    tc = sae_hooks.load(ROOT / "jumprelu_transcoder")
    assert tc.cfg.sites[0].hook == "blocks.3.ln2.hook_normalized"
    assert tc.cfg.sites[0].hook_out == "blocks.3.hook_mlp_out"


def _saelens_reference(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6.x's llama_scope conversion + from_pretrained fold, written out by hand from its loader
    (``llama_scope_sae_huggingface_loader``: W.T, threshold = t * s_in; ``fold_activation_norm_scaling_factor``:
    W_enc *= s_in; apply_b_dec_to_input False); the reconstruction is divided back by s_out."""
    hp = json.loads((folder / "hyperparams.json").read_text())
    w = load_file(str(folder / "checkpoints" / "final.safetensors"))
    s_in = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["out"]
    pre = x @ (w["encoder.weight"].T * s_in) + w["encoder.bias"]
    f = torch.relu(pre) * (pre > hp["jump_relu_threshold"] * s_in)
    return f, (f @ w["decoder.weight"].T + w["decoder.bias"]) / s_out


@pytest.mark.parametrize("name", ["jumprelu_sae", "jumprelu_transcoder"])
def test_saelens_convention_is_an_option(name):
    g = golden(name)
    sae = sae_hooks.load(ROOT / name, convention="saelens")
    f_ref, recon_ref = _saelens_reference(ROOT / name, g["x"])
    torch.testing.assert_close(sae.encode(g["x"]), f_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(sae(g["x"]), recon_ref, atol=ATOL, rtol=0)
    # The conventions give latents in different units, and (with non-unit decoder norms) disagree on which fire.
    authors = sae_hooks.load(ROOT / name).encode(g["x"])
    assert (authors - f_ref).abs().max() > 0.5
    if name == "jumprelu_sae":
        assert ((authors != 0) != (f_ref != 0)).any()


def test_convention_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(ConfigError, match="convention"):
        sae_hooks.load(ROOT / "jumprelu_sae", convention="neuronpedia")
    from sae_hooks.saes import make_sae

    make_sae("relu", 4, 8).save(tmp_path / "n")
    with pytest.raises(ConfigError, match="convention= applies to"):
        sae_hooks.load(tmp_path / "n", convention="authors")


def test_pt_checkpoint_read_with_weights_only(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    shutil.copy(ROOT / "jumprelu_sae" / "hyperparams.json", folder)
    state = load_file(str(ROOT / "jumprelu_sae" / "checkpoints" / "final.safetensors"))
    (folder / "checkpoints").mkdir()
    torch.save({"sae": state, "version": "0.1.0"}, folder / "checkpoints" / "final.pt")
    g = golden("jumprelu_sae")
    torch.testing.assert_close(sae_hooks.load(folder).encode(g["x"]), g["latents"], atol=ATOL, rtol=0)


def test_token_wise_normalisation_is_refused(tmp_path):
    folder = tmp_path / "tw"
    shutil.copytree(ROOT / "jumprelu_sae", folder)
    hp = json.loads((folder / "hyperparams.json").read_text())
    hp["norm_activation"] = "token-wise"
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    with pytest.raises(SAEFormatError, match="token-wise"):
        sae_hooks.load(folder)
