"""GPT-2 attention-output (hook_z) SAEs of Kissane et al.: ``<name>.pt`` + ``<name>_cfg.json`` as their
``AutoEncoder.save`` writes them; expected outputs from their ``AutoEncoder.forward``
(ckkissane/attention-output-saes ``common/torch_modules/autoencoder.py``): relu((x - b_dec) W_enc + b_enc) W_dec + b_dec."""

from __future__ import annotations

import json

import torch

import sae_hooks
from sae_hooks.hub import releases as R

NAME = "gpt2-small_L3_Hcat_z_lr1.20e-03_l11.80e+00_ds16_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v9"
H, DH, F = 4, 2, 16


def _write(folder, layer=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(H * DH, F, generator=g) * 0.6, "W_dec": torch.randn(F, H * DH, generator=g) * 0.6,
         "b_enc": torch.randn(F, generator=g) * 0.3, "b_dec": torch.randn(H * DH, generator=g) * 0.3}
    name = NAME.replace("_L3_", f"_L{layer}_")
    torch.save(w, folder / f"{name}.pt")
    (folder / f"{name}_cfg.json").write_text(json.dumps({
        "act_size": H * DH, "dict_size": F, "act_name": f"blocks.{layer}.attn.hook_z", "layer": layer, "site": "z",
        "model_name": "gpt2-small", "enc_dtype": "fp32", "l1_coeff": 1.8, "seed": 49, "head": "cat"}))
    return f"{name}.pt", w


def test_hook_z_sae_matches_the_authors_forward(tmp_path):
    fname, w = _write(tmp_path)
    _write(tmp_path, layer=4, seed=1)  # a second SAE in the same folder
    sae = sae_hooks.load(tmp_path, fname)
    assert sae.cfg.metadata["source_format"] == "connor_rob_hook_z"
    assert sae.cfg.hook_name == "blocks.3.attn.hook_z" and sae.cfg.reshape == "hook_z"
    assert sae.cfg.sites[0].module == "transformer.h.3.attn.c_proj:input"
    z = torch.randn(2, 5, H, DH) * 2
    x = z.flatten(-2)
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(z), acts, atol=1e-5, rtol=0)
    out = sae(z)
    assert out.shape == z.shape
    torch.testing.assert_close(out.flatten(-2), acts @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=0)


def test_release_loads_through_the_hub(hub_server, tmp_path):
    rel = R.get_release("gpt2-small-hook-z-kk")
    assert rel.supported and rel.layers == list(range(12))
    listed = rel.resolve("blocks.3.hook_z")
    fname, w = _write(tmp_path, layer=3)
    files = {listed.path: (tmp_path / fname).read_bytes(),
             listed.path[: -len(".pt")] + "_cfg.json": (tmp_path / fname.replace(".pt", "_cfg.json")).read_bytes()}
    hub_server.create_repo(rel.repo_id, files)
    sae = sae_hooks.load("gpt2-small-hook-z-kk", "blocks.3.hook_z")
    assert sae.cfg.hook_name == "blocks.3.attn.hook_z" and sae.cfg.model_name == "gpt2"
    torch.testing.assert_close(sae.W_enc, w["W_enc"])
