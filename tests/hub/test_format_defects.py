"""Issue 13 defects 2 and 4: Gemma Scope 2 sites, misleading detection, SAELens 4-5 fine-tuning scale,
dictionary_learning's submodule_name, tuned-lens MLSAEs. Expected values are computed here by hand from the
formula each library documents (file and line cited), on random non-trivial weights."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sae_hooks
from sae_hooks.errors import SAEFormatError, UnknownArchitectureError
from sae_hooks.hub.detect import UnknownFormatError
from sae_hooks.hub.releases import SAEIdNotFoundError

D, F = 8, 16
G = torch.Generator().manual_seed(0)


def rnd(*shape, scale=0.5):
    return torch.randn(*shape, generator=G) * scale


def jumprelu_ref(x, W_enc, b_enc, W_dec, b_dec, thr):
    pre = x @ W_enc + b_enc
    f = torch.relu(pre) * (pre > thr)
    return f, f @ W_dec + b_dec


def gs2_folder(root, rel, config=None, d_in=D):
    folder = root / rel
    folder.mkdir(parents=True)
    p = {"w_enc": rnd(d_in, F), "w_dec": rnd(F, d_in), "b_enc": rnd(F, scale=0.3), "b_dec": rnd(d_in, scale=0.3),
         "threshold": rnd(F).abs()}
    save_file(p, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder, p


# ------------------------------------------------------------------------------------------- Gemma Scope 2


def test_gemma_scope_2_attention_sae_takes_hook_z(tmp_path):
    # 4 heads x d_head 2 = d_in 8: the tensor of attn.hook_z is (batch, pos, n_heads, d_head).
    folder, p = gs2_folder(tmp_path, "attn_out/layer_5_width_16k_l0_small", {
        "architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
        "hf_hook_point_in": "model.layers.5.self_attn.o_proj.input"})
    sae = sae_hooks.load(folder)
    site = sae.cfg.sites[0]
    assert site.hook == "blocks.5.attn.hook_z" and sae.cfg.reshape == "hook_z"
    assert site.module == "model.layers.5.self_attn.o_proj:input"  # the flat concatenation of the heads
    z = torch.randn(2, 3, 4, 2)
    f_ref, y_ref = jumprelu_ref(z.flatten(-2), p["w_enc"], p["b_enc"], p["w_dec"], p["b_dec"], p["threshold"])
    torch.testing.assert_close(sae.encode(z), f_ref, atol=1e-5, rtol=0)
    out = sae(z)
    assert out.shape == z.shape  # hook_z keeps its head shape
    torch.testing.assert_close(out.flatten(-2), y_ref, atol=1e-5, rtol=0)


def test_gemma_scope_2_transcoder_without_config_reads_normalised_mlp_input(tmp_path):
    folder, _ = gs2_folder(tmp_path / "gemma-scope-2-1b-pt", "transcoder/layer_3_width_16k_l0_big")
    sae = sae_hooks.load(folder, model_name="google/gemma-3-1b-pt")
    site = sae.cfg.sites[0]
    assert (site.hook, site.hook_out) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert (site.module, site.module_out) == ("model.layers.3.pre_feedforward_layernorm",
                                              "model.layers.3.post_feedforward_layernorm")


@pytest.mark.parametrize("raw,expected", [("gemma-v3-1b-pt", "google/gemma-3-1b-pt"),
                                          ("gemma-v3-270m-pt", "google/gemma-3-270m"),
                                          ("google/gemma-3-4b-it", "google/gemma-3-4b-it")])
def test_gemma_scope_2_model_name_is_normalised(tmp_path, raw, expected):
    folder, _ = gs2_folder(tmp_path, "resid_post/layer_7_width_16k_l0_small",
                           {"architecture": "jump_relu", "model_name": raw})
    sae = sae_hooks.load(folder)
    assert sae.cfg.model_name == expected
    assert sae.cfg.sites[0].module == "model.layers.7"  # a known family: module paths are filled in


def test_gemma_scope_2_model_from_repo_id_when_no_config(tmp_path):
    folder, _ = gs2_folder(tmp_path / "google" / "gemma-scope-2-4b-it", "resid_post/layer_2_width_16k_l0_small")
    sae = sae_hooks.load(folder)
    assert sae.cfg.model_name == "google/gemma-3-4b-it" and sae.cfg.sites[0].module == "model.layers.2"


# ------------------------------------------------------------------------------------------- detection


def test_lone_ae_pt_is_not_an_openai_sae(tmp_path):
    torch.save({"encoder.weight": rnd(F, D), "encoder.bias": rnd(F), "decoder.weight": rnd(D, F),
                "bias": rnd(D)}, tmp_path / "ae.pt")
    with pytest.raises(UnknownFormatError, match="dictionary_learning.*config.json is missing"):
        sae_hooks.load(tmp_path)


def test_transformers_model_folder_is_not_an_mlsae(tmp_path):
    save_file({"model.embed_tokens.weight": rnd(10, D)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                      "hidden_size": D}))
    with pytest.raises(UnknownFormatError, match="transformers model.*'llama'"):
        sae_hooks.load(tmp_path)


def test_dictionary_learning_training_backup_is_named(tmp_path):
    cfg = {"trainer": {"dict_class": "AutoEncoder", "activation_dim": D, "dict_size": F, "layer": 3,
                       "lm_name": "EleutherAI/pythia-70m-deduped"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = {"encoder.weight": rnd(F, D), "encoder.bias": rnd(F), "decoder.weight": rnd(D, F), "bias": rnd(D)}
    # dictionary_learning training.py's backup_steps schema (sparsify-dictionary-learning-nnterp.md 2.3).
    torch.save({"step": 500, "ae": state, "optimizer": {"state": {}}, "config": cfg, "norm_factor": 1.5},
               tmp_path / "ae.pt")
    with pytest.raises(SAEFormatError, match="training backup.*step 500"):
        sae_hooks.load(tmp_path)


def test_empty_folder_says_so(tmp_path):
    with pytest.raises(SAEIdNotFoundError, match="holds no files"):
        sae_hooks.load(tmp_path)


# ------------------------------------------------------------------------------------------- Gemma Scope 1 npz


def _npz(path, **arrays):
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in arrays.items()})
    path.write_bytes(buf.getvalue())


def test_gemma_scope_1_non_unit_scaling_factor_is_applied(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_4" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    p = {"W_enc": rnd(D, F), "W_dec": rnd(F, D), "b_enc": rnd(F, scale=0.3), "b_dec": rnd(D, scale=0.3),
         "threshold": rnd(F).abs()}
    s = rnd(F).abs() + 0.5
    _npz(folder / "params.npz", **p, scaling_factor=s)
    sae = sae_hooks.load(folder)
    x = torch.randn(4, D) * 2
    # SAELens 4-5 decode: (f * scaling_factor) @ W_dec + b_dec (sae.py v5.11.0 line 459).
    f, _ = jumprelu_ref(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], p["threshold"])
    torch.testing.assert_close(sae(x), (f * s) @ p["W_dec"] + p["b_dec"], atol=1e-5, rtol=0)


def test_gemma_scope_1_unknown_extra_array_is_refused(tmp_path):
    folder = tmp_path / "layer_4" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    _npz(folder / "params.npz", W_enc=rnd(D, F), W_dec=rnd(F, D), b_enc=rnd(F), b_dec=rnd(D), threshold=rnd(F).abs(),
         log_sparsity=rnd(F))
    with pytest.raises(SAEFormatError, match="unexpected arrays \\['log_sparsity'\\]"):
        sae_hooks.load(folder, hook="blocks.4.hook_resid_post")


# ------------------------------------------------------------------------------------------- SAELens 4-5


def test_saelens_5_finetuning_scaling_factor(tmp_path):
    # A SAELens 5.x cfg.json (no sae_lens_version >= 6) with finetuning_scaling_factor: true, and its tensor.
    cfg = {"d_in": D, "d_sae": F, "hook_name": "blocks.2.hook_resid_pre", "architecture": "standard",
           "activation_fn_str": "relu", "apply_b_dec_to_input": True, "finetuning_scaling_factor": True,
           "normalize_activations": "none", "dtype": "float32", "model_name": "gpt2-small",
           "sae_lens_training_version": "5.11.0"}
    w = {"W_enc": rnd(D, F), "b_enc": rnd(F, scale=0.3), "W_dec": rnd(F, D), "b_dec": rnd(D, scale=0.3),
         "finetuning_scaling_factor": rnd(F).abs() + 0.5}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    sae = sae_hooks.load(tmp_path)
    x = torch.randn(4, D) * 2
    # SAELens 5.11 sae.py: encode relu((x - b_dec) @ W_enc + b_enc); decode (f * s) @ W_dec + b_dec (line 459).
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x), f, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x), (f * w["finetuning_scaling_factor"]) @ w["W_dec"] + w["b_dec"], atol=1e-5,
                               rtol=0)


# ------------------------------------------------------------------------------------------- dictionary_learning


@pytest.mark.parametrize("submodule,hook", [("mlp_out_layer_3", "blocks.3.hook_mlp_out"),
                                            ("attn_out_layer_3", "blocks.3.hook_attn_out"),
                                            ("resid_post_layer_3", "blocks.3.hook_resid_post")])
def test_dictionary_learning_submodule_name_sets_the_site(tmp_path, submodule, hook):
    cfg = {"trainer": {"dict_class": "AutoEncoder", "activation_dim": D, "dict_size": F, "layer": 3,
                       "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": submodule}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save({"encoder.weight": rnd(F, D), "encoder.bias": rnd(F), "decoder.weight": rnd(D, F), "bias": rnd(D)},
               tmp_path / "ae.pt")
    sae = sae_hooks.load(tmp_path)
    assert sae.cfg.hook_name == hook


# ------------------------------------------------------------------------------------------- MLSAE


def test_mlsae_tuned_lens_repo_is_refused(tmp_path):
    folder = tmp_path / "mlsae-pythia-70m-deduped-x64-k32-lens"
    folder.mkdir()
    save_file({"encoder.weight": rnd(F, D), "decoder.weight": rnd(D, F), "pre_encoder_bias": rnd(D)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"n_inputs": D, "n_latents": F, "k": 4}))
    with pytest.raises(UnknownArchitectureError, match="tuned-lens"):
        sae_hooks.load(folder)
