"""Every foreign format: files built from the documented layout (tiny shapes), loaded through
``sae_hooks.load(path)`` with the format auto-detected, compared with a reference forward pass written
directly from the paper / reference implementation (tests/_format_refs.py), at float32 precision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import _format_refs as ref
import sae_hooks

from sae_hooks.hub.detect import detect_format

ATOL = 1e-5
D, F = 8, 24


@pytest.fixture(autouse=True)
def _inference_only():
    """Every test here is inference: no autograd graph (scoped to the test, restored afterwards)."""
    with torch.no_grad():
        yield


def rnd(*shape, seed=0, scale=0.5):
    g = np.random.default_rng(seed + 17 * len(shape) + sum(shape))
    return (g.standard_normal(shape) * scale).astype(np.float32)


def xs(seed=1, n=6, d=D, scale=2.0):
    return rnd(n, d, seed=seed, scale=scale)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def check(sae, x, f_ref, y_ref, atol=ATOL):
    xt = t(x)
    with torch.no_grad():
        f = sae.encode(xt).double().numpy()
        y = sae(xt).double().numpy()
    np.testing.assert_allclose(f, f_ref, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=atol, rtol=1e-5)
    return float(np.abs(f - f_ref).max()), float(np.abs(y - y_ref).max())


def f64(d):
    return {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}


# ------------------------------------------------------------------------------------------- Gemma Scope 1


def gemma_params(d_in=D, d_sae=F, d_out=None, seed=0):
    d_out = d_out or d_in
    return {
        "W_enc": rnd(d_in, d_sae, seed=seed), "W_dec": rnd(d_sae, d_out, seed=seed + 1),
        "b_enc": rnd(d_sae, seed=seed + 2, scale=0.5), "b_dec": rnd(d_out, seed=seed + 3),
        "threshold": np.abs(rnd(d_sae, seed=seed + 4)),
    }


def test_gemma_scope_1_residual(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    p = gemma_params()
    np.savez(folder / "params.npz", **p)
    sae = sae_hooks.load(folder)
    assert sae.cfg.metadata["source_format"] == "gemma_scope"
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post"
    x = xs()
    check(sae, x, *ref.gemma_scope(x.astype(np.float64), **f64(p)))


def test_gemma_scope_1_attention_hook_z_keeps_head_shape(tmp_path):
    n_heads, d_head = 2, 4
    folder = tmp_path / "gemma-scope-2b-pt-att" / "layer_1" / "width_16k" / "average_l0_9"
    folder.mkdir(parents=True)
    p = gemma_params(d_in=n_heads * d_head)
    np.savez(folder / "params.npz", **p)
    sae = sae_hooks.load(folder)
    assert sae.cfg.hook_name == "blocks.1.attn.hook_z" and sae.cfg.reshape == "hook_z"
    z = rnd(3, 5, n_heads, d_head, seed=9)
    out = sae(t(z))
    assert out.shape == z.shape
    _, y_ref = ref.gemma_scope(z.reshape(3, 5, -1).astype(np.float64), **f64(p))
    np.testing.assert_allclose(out.double().numpy().reshape(3, 5, -1), y_ref, atol=ATOL)


def test_gemma_scope_1_embedding_rescale(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_4k" / "average_l0_6"
    folder.mkdir(parents=True)
    p = gemma_params()
    np.savez(folder / "params.npz", **p)
    sae = sae_hooks.load(folder)
    assert sae.cfg.hook_name == "hook_embed"
    # Reference: the SAE was trained on unscaled embeddings e; hook_embed holds e * sqrt(d_model).
    e = xs(seed=4)
    scaled = e * math.sqrt(D)
    f_ref, y_ref = ref.gemma_scope(e.astype(np.float64), **f64(p))
    f, y = sae.encode(t(scaled)).double().numpy(), sae(t(scaled)).double().numpy()
    np.testing.assert_allclose(f, f_ref, atol=1e-4)
    np.testing.assert_allclose(y, y_ref * math.sqrt(D), atol=1e-4)


def test_gemma_scope_1_transcoder(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_2" / "width_16k" / "average_l0_76"
    folder.mkdir(parents=True)
    p = gemma_params(d_out=6)
    np.savez(folder / "params.npz", **p)
    sae = sae_hooks.load(folder)
    site = sae.cfg.sites[0]
    assert (site.hook, site.hook_out) == ("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out")
    x = xs()
    check(sae, x, *ref.gemma_scope(x.astype(np.float64), **f64(p)))


def test_gemma_scope_npz_with_pickled_object_is_refused(tmp_path):
    folder = tmp_path / "layer_0"
    folder.mkdir()
    p = gemma_params()
    np.savez(folder / "params.npz", **p, junk=np.array([{"a": 1}], dtype=object))
    with pytest.raises(sae_hooks.SAEFormatError, match="params.npz"):
        sae_hooks.load(folder)


# ------------------------------------------------------------------------------------------- Gemma Scope 2


def test_gemma_scope_2_affine_transcoder(tmp_path):
    folder = tmp_path / "transcoder" / "layer_5_width_16k_l0_big_affine"
    folder.mkdir(parents=True)
    p = gemma_params(d_out=D)
    skip = rnd(D, D, seed=33, scale=0.3)
    save_file({"w_enc": t(p["W_enc"]), "w_dec": t(p["W_dec"]), "b_enc": t(p["b_enc"]), "b_dec": t(p["b_dec"]),
               "threshold": t(p["threshold"]), "affine_skip_connection": t(skip)}, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "google/gemma-3-1b-pt", "affine_connection": True,
        "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output"}))
    sae = sae_hooks.load(folder)
    assert sae.cfg.metadata["source_format"] == "gemma_scope_2" and sae.cfg.skip
    site = sae.cfg.sites[0]
    # The input is what config.json names: the MLP's normalised input after the norm's scale (issue 13 defect 2; was
    # hook_mlp_in): ln2.hook_out, since the site layer made ln2.hook_normalized the pre-affine tensor.
    assert (site.hook, site.hook_out) == ("blocks.5.ln2.hook_out", "blocks.5.hook_mlp_out")
    assert (site.module, site.module_out) == ("model.layers.5.pre_feedforward_layernorm",
                                              "model.layers.5.post_feedforward_layernorm")
    assert sae.cfg.model_name == "google/gemma-3-1b-pt"
    x = xs()
    check(sae, x, *ref.gemma_scope(x.astype(np.float64), **f64(p), W_skip=skip.astype(np.float64)))


def test_gemma_scope_2_dims_come_from_tensors_not_folder_names(tmp_path):
    folder = tmp_path / "resid_post" / "layer_7_width_262k_l0_small"  # folder says 262k; tensors say 24
    folder.mkdir(parents=True)
    p = gemma_params()
    save_file({k.lower() if k.startswith("W") else k: t(v) for k, v in p.items()}, folder / "params.safetensors")
    sae = sae_hooks.load(folder)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D, F)
    assert sae.cfg.hook_name == "blocks.7.hook_resid_post"


# ------------------------------------------------------------------------------------------- Llama Scope


def _llama(tmp_path, d_out=D, norm_in=3.0, norm_out=3.0, hook_out=None):
    folder = tmp_path / "Llama3_1-8B-Base-L4R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    enc_w, enc_b = rnd(F, D, seed=5), rnd(F, seed=6, scale=0.3)
    dec_w, dec_b = rnd(d_out, F, seed=7), rnd(d_out, seed=8)
    save_file({"encoder.weight": t(enc_w), "encoder.bias": t(enc_b), "decoder.weight": t(dec_w),
               "decoder.bias": t(dec_b)}, folder / "checkpoints" / "final.safetensors")
    hp = {"d_model": D, "d_sae": F, "hook_point_in": "blocks.4.hook_resid_post",
          "hook_point_out": hook_out or "blocks.4.hook_resid_post", "jump_relu_threshold": 0.2,
          "norm_activation": "dataset-wise", "act_fn": "jumprelu", "top_k": 5,
          "dataset_average_activation_norm": {"in": norm_in, "out": norm_out}}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return folder, (enc_w, enc_b, dec_w, dec_b)


def test_llama_scope_folds_dataset_norm(tmp_path):
    folder, (enc_w, enc_b, dec_w, dec_b) = _llama(tmp_path)
    # SAELens's convention (the authors' own loader is the default: tests/hub/test_llama_scope.py).
    sae = sae_hooks.load(folder, convention="saelens")
    assert sae.cfg.metadata["source_format"] == "llama_scope"
    assert sae.cfg.normalize == "none" and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.hook_name == "blocks.4.hook_resid_post"
    x = xs(scale=1.0)
    args = [a.astype(np.float64) for a in (enc_w, enc_b, dec_w, dec_b)]
    check(sae, x, *ref.llama_scope(x.astype(np.float64), *args, 0.2, 3.0, 3.0, D))


def test_llama_scope_transcoder_uses_output_norm(tmp_path):
    folder, (enc_w, enc_b, dec_w, dec_b) = _llama(tmp_path, d_out=6, norm_in=3.0, norm_out=0.5,
                                                  hook_out="blocks.4.hook_mlp_out")
    sae = sae_hooks.load(folder, convention="saelens")
    assert sae.cfg.sites[0].hook_out == "blocks.4.hook_mlp_out"
    x = xs(scale=1.0)
    args = [a.astype(np.float64) for a in (enc_w, enc_b, dec_w, dec_b)]
    check(sae, x, *ref.llama_scope(x.astype(np.float64), *args, 0.2, 3.0, 0.5, D))


# ------------------------------------------------------------------------------------------- OpenAI


def _openai_state(k=4):
    st = {"pre_bias": rnd(D, seed=11, scale=0.3), "encoder.weight": rnd(F, D, seed=12),
          "latent_bias": rnd(F, seed=13, scale=0.3), "decoder.weight": rnd(D, F, seed=14)}
    return st


def test_openai_topk_standardises_per_token(tmp_path):
    folder = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders"
    folder.mkdir(parents=True)
    st = _openai_state()
    torch.save({**{k: t(v) for k, v in st.items()}, "stats_last_nonzero": torch.zeros(F, dtype=torch.int64),
                "activation": "TopK", "activation_state_dict": {"k": 4, "postact_fn": "ReLU"}}, folder / "5.pt")
    (folder / "6.pt").write_bytes((folder / "5.pt").read_bytes())
    sae = sae_hooks.load(folder / "5.pt")
    assert sae.cfg.metadata["source_format"] == "openai"
    assert sae.cfg.hook_name == "blocks.5.hook_resid_post" and sae.cfg.k == 4
    x = xs()
    s = f64(st)
    check(sae, x, *ref.openai_topk(x.astype(np.float64), s["pre_bias"], s["encoder.weight"], s["latent_bias"],
                                   s["decoder.weight"], 4))
    # The same file through (folder, sae_id):
    same = sae_hooks.load(tmp_path, "resid_post_mlp_v5_32k/autoencoders/5.pt")
    assert torch.equal(same.W_enc, sae.W_enc)


def test_openai_relu(tmp_path):
    st = _openai_state()
    torch.save({**{k: t(v) for k, v in st.items()}, "activation": "ReLU"}, tmp_path / "3.pt")
    sae = sae_hooks.load(tmp_path / "3.pt")
    assert sae.cfg.architecture == "relu" and sae.cfg.normalize == "none"
    x = xs()
    s = f64(st)
    check(sae, x, *ref.openai_relu(x.astype(np.float64), s["pre_bias"], s["encoder.weight"], s["latent_bias"],
                                   s["decoder.weight"]))


# ------------------------------------------------------------------------------------------- MLSAE


def test_mlsae_records_every_layer(tmp_path):
    folder = tmp_path / "mlsae-pythia-70m-deduped-x3-k4"
    folder.mkdir()
    enc, dec, b = rnd(F, D, seed=21), rnd(D, F, seed=22), rnd(D, seed=23, scale=0.3)
    save_file({"encoder.weight": t(enc), "decoder.weight": t(dec), "pre_encoder_bias": t(b)},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"n_inputs": D, "n_latents": F, "k": 4,
                                                    "dead_steps_threshold": 1000, "standardize": True}))
    sae = sae_hooks.load(folder)
    assert sae.cfg.metadata["source_format"] == "mlsae"
    assert [s.hook for s in sae.cfg.sites] == [f"blocks.{i}.hook_resid_post" for i in range(6)]
    assert sae.cfg.sites[0].module == "gpt_neox.layers.0"
    x = xs()
    check(sae, x, *ref.mlsae(x.astype(np.float64), *[a.astype(np.float64) for a in (enc, dec, b)], 4))
    assert len(sae_hooks.load(folder, n_layers=3).cfg.sites) == 3  # the caller beats the guess from the name
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layers": 2}))
    assert len(sae_hooks.load(folder).cfg.sites) == 2


# ------------------------------------------------------------------------------------------- SAELens


def _saelens_dir(tmp_path, name, cfg, tensors):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: t(v) for k, v in tensors.items()}, folder / "sae_weights.safetensors")
    return folder


def _v6(arch, **extra):
    meta = {"sae_lens_version": "6.54.12", "model_name": "gpt2", "hook_name": "blocks.2.hook_resid_pre"}
    meta.update(extra.pop("metadata", {}))
    return {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
            "metadata": meta, **extra}


def _std_tensors(seed=0, d_out=D):
    return {"W_enc": rnd(D, F, seed=seed), "b_enc": rnd(F, seed=seed + 1, scale=0.3),
            "W_dec": rnd(F, d_out, seed=seed + 2), "b_dec": rnd(d_out, seed=seed + 3, scale=0.3)}


SAELENS_CASES = {
    "standard": (_v6("standard"), {}),
    "standard_layer_norm": (_v6("standard", normalize_activations="layer_norm"), {}),
    "standard_constant_norm_rescale": (_v6("standard", normalize_activations="constant_norm_rescale"), {}),
    "topk_rescaled": (_v6("topk", k=5, rescale_acts_by_decoder_norm=True), {}),
    "topk_plain": (_v6("topk", k=5, apply_b_dec_to_input=False), {}),
    "jumprelu": (_v6("jumprelu", apply_b_dec_to_input=False), {"threshold": np.abs(rnd(F, seed=40))}),
    "jumprelu_log_threshold": (_v6("jumprelu"), {"log_threshold": rnd(F, seed=41, scale=0.5)}),
    "gated": (_v6("gated"), {"b_gate": rnd(F, seed=42, scale=0.3), "b_mag": rnd(F, seed=43, scale=0.3),
                             "r_mag": rnd(F, seed=44, scale=0.3)}),
    "transcoder": (_v6("transcoder", d_out=6, apply_b_dec_to_input=False,
                       metadata={"hook_name_out": "blocks.2.hook_mlp_out"}), {}),
    "skip_transcoder": (_v6("skip_transcoder", d_out=6, metadata={"hook_name_out": "blocks.2.hook_mlp_out"}),
                        {"W_skip": rnd(6, D, seed=45, scale=0.3)}),
    "jumprelu_skip_transcoder": (_v6("jumprelu_skip_transcoder", d_out=6,
                                     metadata={"hook_name_out": "blocks.2.hook_mlp_out"}),
                                 {"W_skip": rnd(6, D, seed=46, scale=0.3), "threshold": np.abs(rnd(F, seed=47))}),
}


@pytest.mark.parametrize("case", sorted(SAELENS_CASES))
def test_saelens_v6(tmp_path, case):
    cfg, extra = SAELENS_CASES[case]
    d_out = cfg.get("d_out", D)
    tensors = {**_std_tensors(d_out=d_out), **extra}
    if cfg["architecture"] == "gated":
        tensors.pop("b_enc")
    folder = _saelens_dir(tmp_path, case, cfg, tensors)
    sae = sae_hooks.load(folder)
    assert sae.cfg.metadata["source_format"] == "saelens"
    assert sae.cfg.hook_name == "blocks.2.hook_resid_pre"
    if "transcoder" in case:
        assert sae.cfg.sites[0].hook_out == "blocks.2.hook_mlp_out"
    x = xs()
    check(sae, x, *ref.saelens(x.astype(np.float64), f64(tensors), cfg))


def test_saelens_expected_average_only_in_folds_factor(tmp_path):
    cfg = _v6("standard", normalize_activations="expected_average_only_in")
    tensors = _std_tensors()
    folder = _saelens_dir(tmp_path, "eao", cfg, tensors)
    s = 0.37
    sae = sae_hooks.load(folder, norm_scaling_factor=s)
    x = xs()
    # SAELens applies s outside the SAE: reconstruct(s * x) / s.
    f_ref, y_ref = ref.saelens(s * x.astype(np.float64), f64(tensors), {**cfg, "normalize_activations": "none"})
    check(sae, x, f_ref, y_ref / s)
    with pytest.warns(UserWarning, match="norm_scaling_factor"):
        sae_hooks.load(folder)


def test_saelens_pre6_config_topk_and_hook_z(tmp_path):
    cfg = {"d_in": D, "d_sae": F, "hook_point": "blocks.1.attn.hook_z", "hook_point_layer": 1,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "normalize_activations": False,
           "dtype": "torch.float32", "model_name": "gpt2-small"}
    tensors = _std_tensors()
    tensors["scaling_factor"] = np.ones(F, dtype=np.float32)
    folder = _saelens_dir(tmp_path, "v5", cfg, tensors)
    sae = sae_hooks.load(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3 and sae.cfg.reshape == "hook_z"
    assert sae.cfg.apply_b_dec_to_input
    x = xs()
    tensors.pop("scaling_factor")
    check(sae, x, *ref.saelens(x.astype(np.float64), f64(tensors),
                               {"architecture": "topk", "k": 3, "d_in": D, "apply_b_dec_to_input": True}))


def test_saelens_non_unit_scaling_factor_is_folded_into_decoder(tmp_path):
    tensors = _std_tensors()
    s = np.abs(rnd(F, seed=50)) + 0.5
    folder = _saelens_dir(tmp_path, "sf", {"d_in": D, "d_sae": F, "hook_point": "blocks.0.hook_resid_pre"},
                          {**tensors, "scaling_factor": s})
    sae = sae_hooks.load(folder)
    x = xs().astype(np.float64)
    st = f64(tensors)
    f = ref.relu((x - st["b_dec"]) @ st["W_enc"] + st["b_enc"])
    check(sae, x.astype(np.float32), f, (f * s) @ st["W_dec"] + st["b_dec"])


# ------------------------------------------------------------------------------------------- sparsify


def _sparsify_dir(root, hookpoint, *, transcode=False, skip=False, normalize_decoder=True, dtype=torch.float32,
                  d_out=D):
    folder = root / hookpoint
    folder.mkdir(parents=True)
    enc_w, enc_b = rnd(F, D, seed=60), rnd(F, seed=61, scale=0.3)
    W_dec, b_dec = rnd(F, d_out, seed=62), rnd(d_out, seed=63, scale=0.5)
    tensors = {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec}
    if skip:
        tensors["W_skip"] = rnd(d_out, D, seed=64, scale=0.3)
    save_file({k: t(v).to(dtype) for k, v in tensors.items()}, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 3, "normalize_decoder": normalize_decoder, "num_latents": 0,
        "k": 4, "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": D}))
    return folder, tensors


@pytest.mark.parametrize("normalize_decoder", [True, False])
def test_sparsify_subtracts_b_dec_whatever_normalize_decoder_says(tmp_path, normalize_decoder):
    folder, st = _sparsify_dir(tmp_path, "layers.3", normalize_decoder=normalize_decoder)
    sae = sae_hooks.load(folder)
    assert sae.cfg.metadata["source_format"] == "sparsify"
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post" and sae.cfg.apply_b_dec_to_input
    x = xs()
    s = f64(st)
    check(sae, x, *ref.sparsify(x.astype(np.float64), s["encoder.weight"], s["encoder.bias"], s["W_dec"],
                                s["b_dec"], 4))


def test_sparsify_skip_transcoder(tmp_path):
    folder, st = _sparsify_dir(tmp_path, "layers.1.mlp", transcode=True, skip=True)
    sae = sae_hooks.load(folder)
    site = sae.cfg.sites[0]
    # sparsify's hook reads the MLP module's input (the norm's output, after its scale) and replaces its output
    # (on Gemma before the post-MLP norm): mlp.hook_in -> mlp.hook_out, not the pre-affine ln2.hook_normalized.
    assert (site.hook, site.hook_out) == ("blocks.1.mlp.hook_in", "blocks.1.mlp.hook_out")
    assert not sae.cfg.apply_b_dec_to_input and sae.cfg.skip
    x = xs()
    s = f64(st)
    check(sae, x, *ref.sparsify(x.astype(np.float64), s["encoder.weight"], s["encoder.bias"], s["W_dec"],
                                s["b_dec"], 4, transcode=True, W_skip=s["W_skip"]))


def test_sparsify_bf16_keeps_file_dtype(tmp_path):
    folder, st = _sparsify_dir(tmp_path, "seeds/layers.2/seed1", dtype=torch.bfloat16)
    sae = sae_hooks.load(folder)
    assert sae.dtype == torch.bfloat16 and sae.cfg.hook_name == "blocks.2.hook_resid_post"
    # Reference from the bf16-rounded weights in float64; bf16 matmuls carry ~3 significant digits (8-bit
    # mantissa), so with |x|~2, d=8 and O(1) weights the outputs agree to a few 1e-2 (absolute).
    s = {k: torch.from_numpy(v).to(torch.bfloat16).double().numpy() for k, v in st.items()}
    x = xs()
    xb = torch.from_numpy(x).to(torch.bfloat16).double().numpy()
    f_ref, y_ref = ref.sparsify(xb, s["encoder.weight"], s["encoder.bias"], s["W_dec"], s["b_dec"], 4)
    y = sae(t(x)).double().numpy()
    assert np.abs(y - y_ref).max() < 0.15
    fp32 = sae_hooks.load(folder, dtype="float32")
    assert fp32.dtype == torch.float32
    np.testing.assert_allclose(fp32(t(xb.astype(np.float32))).double().numpy(), y_ref, atol=1e-4)


# ------------------------------------------------------------------------------------------- dictionary_learning


def _dl_state(dict_class):
    enc = {"encoder.weight": rnd(F, D, seed=70), "encoder.bias": rnd(F, seed=71, scale=0.3),
           "decoder.weight": rnd(D, F, seed=72)}
    if dict_class == "AutoEncoder":
        return {**enc, "bias": rnd(D, seed=73, scale=0.3)}
    if dict_class == "AutoEncoderNew":
        return {**enc, "decoder.bias": rnd(D, seed=73, scale=0.3)}
    if dict_class == "GatedAutoEncoder":
        return {"encoder.weight": enc["encoder.weight"], "decoder.weight": enc["decoder.weight"],
                "decoder_bias": rnd(D, seed=74, scale=0.3), "r_mag": rnd(F, seed=75, scale=0.3),
                "gate_bias": rnd(F, seed=76, scale=0.3), "mag_bias": rnd(F, seed=77, scale=0.3)}
    if dict_class == "JumpReluAutoEncoder":
        return {"W_enc": rnd(D, F, seed=78), "b_enc": rnd(F, seed=79, scale=0.3), "W_dec": rnd(F, D, seed=80),
                "b_dec": rnd(D, seed=81, scale=0.3), "threshold": np.abs(rnd(F, seed=82))}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {**enc, "b_dec": rnd(D, seed=83, scale=0.3), "k": np.array(4), "threshold": np.array(0.4, np.float32)}
    return {"W_enc": rnd(D, F, seed=84), "b_enc": rnd(F, seed=85, scale=0.3), "W_dec": rnd(F, D, seed=86),
            "b_dec": rnd(D, seed=87, scale=0.3), "k": np.array(4), "threshold": np.array(0.4, np.float32),
            "group_sizes": np.array([8, 16])}


@pytest.mark.parametrize("dict_class", ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder",
                                        "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_dictionary_learning(tmp_path, dict_class):
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    st = _dl_state(dict_class)
    torch.save({k: t(v) for k, v in st.items()}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({
        "trainer": {"dict_class": dict_class, "activation_dim": D, "dict_size": F, "layer": 3, "k": 4,
                    "lm_name": "EleutherAI/pythia-70m-deduped"}, "buffer": {"ctx_len": 128}}))
    sae = sae_hooks.load(folder)
    assert sae.cfg.metadata["source_format"] == "dictionary_learning"
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post"
    x = xs()
    check(sae, x, *ref.dictionary_learning(x.astype(np.float64), dict_class,
                                           {k: np.asarray(v, np.float64) for k, v in st.items()}))


# ------------------------------------------------------------------------------------------- native, detection


def test_native_round_trip_and_detection(tmp_path):
    sae = sae_hooks.make_sae("topk", D, F, k=3, sites=["blocks.0.hook_resid_post"])
    sae.save(tmp_path / "mine")
    back = sae_hooks.load(tmp_path / "mine")
    assert back.cfg == sae.cfg
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), back.state_dict().values()))


def test_format_override_and_ambiguity(tmp_path):
    folder = _saelens_dir(tmp_path, "both", _v6("standard"), _std_tensors())
    np.savez(folder / "params.npz", **gemma_params())
    from sae_hooks.hub.detect import AmbiguousFormatError

    with pytest.raises(AmbiguousFormatError, match=r"gemma_scope.*saelens|saelens.*gemma_scope"):
        sae_hooks.load(folder)
    assert sae_hooks.load(folder, format="saelens").cfg.metadata["source_format"] == "saelens"
    assert sae_hooks.load(folder, format="gemma_scope").cfg.metadata["source_format"] == "gemma_scope"


def test_unknown_format_lists_files(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    from sae_hooks.hub.detect import UnknownFormatError

    with pytest.raises(UnknownFormatError, match="weights.bin"):
        sae_hooks.load(tmp_path)
    with pytest.raises(UnknownFormatError, match="Known formats"):
        detect_format(["x"], format="saelenz")


# ------------------------------------------------------------------------------------------- bad input


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = _saelens_dir(tmp_path, "trunc", _v6("standard"), _std_tensors())
    w = folder / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-40])
    with pytest.raises(sae_hooks.SAEFormatError, match=r"sae_weights\.safetensors.*(truncated|corrupt)"):
        sae_hooks.load(folder)


def test_shapes_disagreeing_with_config(tmp_path):
    cfg = _v6("standard")
    cfg["d_sae"] = F + 1
    folder = _saelens_dir(tmp_path, "shape", cfg, _std_tensors())
    with pytest.raises(sae_hooks.ShapeMismatchError, match=r"sae_weights\.safetensors.*'W_enc'.*\(8, 24\)"):
        sae_hooks.load(folder)
    folder, _ = _sparsify_dir(tmp_path / "sp", "layers.0")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 99}))
    with pytest.raises(sae_hooks.SAEFormatError, match=r"sae\.safetensors.*99"):
        sae_hooks.load(folder)


def test_unknown_architecture(tmp_path):
    folder = _saelens_dir(tmp_path, "mp", _v6("matching_pursuit"), _std_tensors())
    with pytest.raises(sae_hooks.UnknownArchitectureError, match=r"cfg\.json.*matching_pursuit"):
        sae_hooks.load(folder)
    folder = tmp_path / "dl"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "CrossCoder"}}))
    with pytest.raises(sae_hooks.UnknownArchitectureError, match="CrossCoder"):
        sae_hooks.load(folder)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pt_needing_more_than_weights_only_is_refused(tmp_path, capsys):
    from sae_hooks.errors import UnsafeCheckpointError

    folder = tmp_path / "dl"
    folder.mkdir()
    st = {k: t(v) for k, v in _dl_state("AutoEncoder").items()}
    torch.save({**st, "extra": _Evil()}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(UnsafeCheckpointError, match=r"ae\.pt.*weights_only"):
        sae_hooks.load(folder)
    torch.save({**{k: t(v) for k, v in _openai_state().items()}, "activation": _Evil()}, tmp_path / "7.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"7\.pt"):
        sae_hooks.load(tmp_path / "7.pt")
    assert "must never run" not in capsys.readouterr().out


def test_truncated_pt_and_npz(tmp_path):
    st = {k: t(v) for k, v in _openai_state().items()}
    torch.save({**st, "activation": "ReLU"}, tmp_path / "1.pt")
    (tmp_path / "1.pt").write_bytes((tmp_path / "1.pt").read_bytes()[:100])
    with pytest.raises(sae_hooks.SAEFormatError, match=r"1\.pt"):
        sae_hooks.load(tmp_path / "1.pt")
    folder = tmp_path / "g"
    folder.mkdir()
    np.savez(folder / "params.npz", **gemma_params())
    (folder / "params.npz").write_bytes((folder / "params.npz").read_bytes()[:200])
    with pytest.raises(sae_hooks.SAEFormatError, match=r"params\.npz"):
        sae_hooks.load(folder)


# ------------------------------------------------------------------------------------------- fuzzing configs

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st_  # noqa: E402

from sae_hooks.errors import ConfigError, SAEFormatError  # noqa: E402
from sae_hooks.hub.formats import dictionary_learning as _dl  # noqa: E402
from sae_hooks.hub.formats import gemma_scope as _gs  # noqa: E402
from sae_hooks.hub.formats import llama_scope as _ls  # noqa: E402
from sae_hooks.hub.formats import mlsae as _ml  # noqa: E402
from sae_hooks.hub.formats import saelens as _sl  # noqa: E402
from sae_hooks.hub.formats import sparsify as _sp  # noqa: E402

_KEYS = ["architecture", "d_in", "d_sae", "d_out", "k", "dtype", "apply_b_dec_to_input", "normalize",
         "normalize_activations", "reshape_activations", "metadata", "hook_name", "hook_point", "activation_fn",
         "activation_fn_str", "activation_fn_kwargs", "sae_lens_version", "sites", "norm_scale", "norm_eps", "skip",
         "reshape", "model_name", "num_latents", "expansion_factor", "transcode", "skip_connection", "activation",
         "signed", "d_model", "act_fn", "top_k", "jump_relu_threshold", "norm_activation",
         "dataset_average_activation_norm", "hook_point_in", "hook_point_out", "trainer", "dict_class",
         "activation_dim", "dict_size", "layer", "n_inputs", "n_latents", "standardize", "n_layers",
         "rescale_acts_by_decoder_norm", "affine_connection", "in", "out"]
_VALUES = ["standard", "topk", "jumprelu", "gated", "relu", "batchtopk", "transcoder", "skip_transcoder", "none",
           "layer_norm", "constant_norm_rescale", "expected_average_only_in", "standardize", "norm_rescale",
           "scale", "hook_z", "float32", "bfloat16", "torch.float16", "6.1.0", "5.0.0", "jump_relu", "dataset-wise",
           "AutoEncoder", "AutoEncoderTopK", "blocks.0.hook_z", "blocks.1.hook_resid_post"]
_scalars = (st_.none() | st_.booleans() | st_.integers(-3, 40) | st_.floats(allow_nan=True, allow_infinity=True)
            | st_.sampled_from(_VALUES) | st_.text(max_size=8))
_json = st_.recursive(_scalars, lambda c: st_.lists(c, max_size=3) | st_.dictionaries(st_.sampled_from(_KEYS), c,
                                                                                         max_size=6), max_leaves=20)
_configs = st_.dictionaries(st_.sampled_from(_KEYS), _json, max_size=12) | _json

_READERS = {
    "SAEConfig.from_dict": lambda d: sae_hooks.SAEConfig.from_dict(d),
    "saelens": lambda d: _sl.read_config(d),
    "sparsify": lambda d: _sp.read_config(d),
    "llama_scope": lambda d: _ls.read_config(d),
    "dictionary_learning": lambda d: _dl.read_config(d),
    "mlsae": lambda d: _ml.read_config(d),
    "gemma_scope_2": lambda d: _gs.read_config_2(d),
}


@pytest.mark.parametrize("reader", sorted(_READERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_configs)
@example(data={"architecture": "relu", "d_in": 2, "d_sae": 3, "sites": [1]})
@example(data={"architecture": "relu", "d_in": 2, "d_sae": 3, "sites": 1})
@example(data={"architecture": "relu", "d_in": 2, "d_sae": 3, "sites": [{"hook": 1}]})
@example(data={"architecture": "relu", "d_in": 2, "d_sae": 3, "normalize": "scale", "norm_scale": float("nan")})
@example(data={"d_in": 2, "d_sae": 3, "activation_fn": "topk", "activation_fn_kwargs": [1]})
@example(data={"d_in": 2, "d_sae": 3, "architecture": "topk", "k": 1e300, "sae_lens_version": "6.0"})
@example(data={"d_in": 2, "d_sae": 3, "hook_point": ["x"], "metadata": []})
@example(data={"trainer": {"dict_class": "AutoEncoderTopK", "k": float("nan")}})
@example(data={"d_model": 2, "d_sae": 3, "dataset_average_activation_norm": {"in": 0}})
@example(data=[1, 2])
def test_config_readers_raise_only_typed_errors(reader, data):
    try:
        _READERS[reader](data)
    except (ConfigError, SAEFormatError):
        pass
