"""circuit-tracer ``layer_N.safetensors`` transcoders against circuit-tracer itself: files written by
``SingleLayerTranscoder.to_safetensors``, golden outputs from ``load_transcoder`` (scripts/make_circuit_tracer_fixtures.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae_hooks
from sae_hooks.hub import releases as R

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "circuit_tracer"
FIX = json.loads((ROOT / "manifest.json").read_text())["fixtures"]
ATOL = 1e-5


@pytest.mark.parametrize("name", sorted(FIX))
def test_matches_circuit_tracer(name):
    f = FIX[name]
    g = load_file(str(ROOT / name / "golden.safetensors"))
    sae = sae_hooks.load(ROOT / f["file"], model_name="Qwen/Qwen3-4B")
    assert sae.cfg.metadata["source_format"] == "circuit_tracer"
    layer = f["layer"]
    site = sae.cfg.sites[0]
    assert (site.hook, site.hook_out) == (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")
    assert site.module == f"model.layers.{layer}.post_attention_layernorm"  # the MLP's input tensor
    torch.testing.assert_close(sae.encode(g["x"]), g["latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(sae(g["x"]), g["recon"], atol=ATOL, rtol=0)


def test_config_yaml_sets_the_hooks_and_folder_lists_layers(tmp_path):
    for name in ("relu", "jumprelu"):
        shutil.copy(ROOT / FIX[name]["file"], tmp_path)
    (tmp_path / "config.yaml").write_text("model_name: google/gemma-2-2b\nfeature_input_hook: ln2.hook_normalized\n"
                                          "feature_output_hook: hook_mlp_out\n")
    ids = list(sae_hooks.load_many(tmp_path))
    assert ids == ["layer_3.safetensors", "layer_4.safetensors"]
    sae = sae_hooks.load(tmp_path, "layer_4.safetensors")
    assert sae.cfg.sites[0].hook == "blocks.4.ln2.hook_normalized"


def test_circuit_tracer_release_is_supported():
    rel = R.get_release("mwhanna-qwen3-4b-transcoders")
    assert rel.format == "circuit_tracer" and rel.model == "Qwen/Qwen3-4B"
    assert rel.resolve("layer_0").path == "layer_0.safetensors" and rel.layers == list(range(36))


def test_release_loads_through_the_hub(hub_server):
    data = (ROOT / FIX["jumprelu"]["file"]).read_bytes()
    hub_server.create_repo("mwhanna/qwen3-4b-transcoders", {"layer_0.safetensors": data, "layer_1.safetensors": data})
    sae = sae_hooks.load("mwhanna-qwen3-4b-transcoders", "layer_1")
    assert sae.cfg.sites[0].hook == "blocks.1.mlp.hook_in" and sae.cfg.model_name == "Qwen/Qwen3-4B"
    assert sae.cfg.sites[0].module == "model.layers.1.post_attention_layernorm"
    g = load_file(str(ROOT / "jumprelu" / "golden.safetensors"))
    torch.testing.assert_close(sae.encode(g["x"]), g["latents"], atol=ATOL, rtol=0)
