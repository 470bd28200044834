"""Each Hub format's SAE reads the tensor its authors trained on when attached with no site: with random
norm weights and biases the norm's pre-affine value and its output differ, so a wrong site shows.

* SAELens, Gemma Scope 1 transcoders, circuit-tracer with ``feature_input_hook: ln2.hook_normalized``:
  TransformerLens's ``lnN.hook_normalized``, before the norm's scale (TransformerLens puts the hook there;
  circuit-tracer's nnsight mapping reads ``<norm>.source.self__norm_0``);
* sparsify transcoders (``layers.N.mlp``), circuit-tracer's default ``mlp.hook_in``, Gemma Scope 2
  transcoders (``pre_feedforward_layernorm.output``): the norm's output, the MLP's input.

Truth: the norm's input and output captured by raw forward hooks, the pre-affine value computed by hand.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sae_hooks
from conftest import hf_family_cases, randomize_norms, tiny_hf_gpt2

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=FutureWarning)
D, F, LAYER = 32, 48, 1


def _model(family: str) -> torch.nn.Module:
    if family == "gpt2":
        model = tiny_hf_gpt2(seed=4)
    else:
        cfg, cls, _ = hf_family_cases()[family]
        torch.manual_seed(4)
        model = cls(cfg).eval()
    randomize_norms(model, seed=9)
    return model


def _w(*shape: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _norm_tensors(model: torch.nn.Module, norm_path: str, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The norm's pre-affine value (by hand from its input) and its output, in one forward pass."""
    norm = model.get_submodule(norm_path)
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, out):  # noqa: ANN001, ANN202
        x = args[0].double()
        eps = next(float(getattr(mod, a)) for a in ("eps", "variance_epsilon") if hasattr(mod, a))
        if isinstance(mod, torch.nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        seen["pre_affine"] = (x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()).float()
        seen["output"] = out

    handle = norm.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    assert (seen["pre_affine"] - seen["output"]).abs().max() > 0.1  # the norm's weights make them differ
    return seen


def _read_input_torch(model: torch.nn.Module, sae, tokens: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    from sae_hooks.adapters.torch import attach, detach

    attached = attach(copy.deepcopy(model))
    attached.add_sae(sae)  # at the site the format recorded
    with torch.no_grad(), attached.sae_capture("*.hook_sae_input") as cache:
        attached(tokens)
    (x,) = cache.values()
    detach(attached)
    return x


# Folder builders: each writes what the format's files hold (layouts as in tests/hub/test_formats.py). -----


def _saelens(tmp, hook: str, model_name: str):  # noqa: ANN001, ANN202
    folder = tmp / "saelens"
    folder.mkdir()
    cfg = {"d_in": D, "d_sae": F, "d_out": D, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": "transcoder",
           "metadata": {"sae_lens_version": "6.54.12", "model_name": model_name, "hook_name": hook,
                        "hook_name_out": f"blocks.{LAYER}.hook_mlp_out"}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": _w(D, F, seed=1), "b_enc": _w(F, seed=2, scale=0.1), "W_dec": _w(F, D, seed=3),
               "b_dec": _w(D, seed=4, scale=0.1)}, folder / "sae_weights.safetensors")
    return sae_hooks.load(folder)


def _gemma_scope_1(tmp):  # noqa: ANN001, ANN202
    folder = tmp / "gemma-scope-2b-pt-transcoders" / f"layer_{LAYER}" / "width_16k" / "average_l0_76"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", W_enc=_w(D, F, seed=1).numpy(), W_dec=_w(F, D, seed=3).numpy(),
             b_enc=_w(F, seed=2, scale=0.1).numpy(), b_dec=_w(D, seed=4, scale=0.1).numpy(),
             threshold=_w(F, seed=5, scale=0.05).abs().numpy())
    return sae_hooks.load(folder, model_name="google/gemma-2-2b")


def _gemma_scope_2(tmp):  # noqa: ANN001, ANN202
    folder = tmp / "transcoder" / f"layer_{LAYER}_width_16k_l0_big"
    folder.mkdir(parents=True)
    save_file({"w_enc": _w(D, F, seed=1), "w_dec": _w(F, D, seed=3), "b_enc": _w(F, seed=2, scale=0.1),
               "b_dec": _w(D, seed=4, scale=0.1), "threshold": _w(F, seed=5, scale=0.05).abs()},
              folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "google/gemma-3-1b-pt",
        "hf_hook_point_in": f"model.layers.{LAYER}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{LAYER}.post_feedforward_layernorm.output"}))
    return sae_hooks.load(folder)


def _circuit_tracer(tmp, model_name: str, input_hook: str | None):  # noqa: ANN001, ANN202
    folder = tmp / "circuit_tracer"
    folder.mkdir()
    save_file({"W_enc": _w(F, D, seed=1), "b_enc": _w(F, seed=2, scale=0.1), "W_dec": _w(F, D, seed=3),
               "b_dec": _w(D, seed=4, scale=0.1)}, folder / f"layer_{LAYER}.safetensors")
    if input_hook:
        (folder / "config.yaml").write_text(f"model_name: {model_name}\nfeature_input_hook: {input_hook}\n"
                                            "feature_output_hook: hook_mlp_out\n")
    return sae_hooks.load(folder, f"layer_{LAYER}.safetensors", model_name=model_name)


def _sparsify(tmp, hookpoint: str, model_name: str | None):  # noqa: ANN001, ANN202
    folder = tmp / hookpoint
    folder.mkdir()
    save_file({"encoder.weight": _w(F, D, seed=1), "encoder.bias": _w(F, seed=2, scale=0.1),
               "W_dec": _w(F, D, seed=3), "b_dec": _w(D, seed=4, scale=0.1)}, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": F, "k": 8,
        "multi_topk": False, "skip_connection": False, "transcode": True, "d_in": D}))
    return sae_hooks.load(folder, model_name=model_name) if model_name else sae_hooks.load(folder)


# (case, model family, norm module of layer LAYER, loader, which tensor the authors trained on)
CASES = {
    "saelens_gpt2": ("gpt2", "transformer.h.1.ln_2",
                     lambda tmp: _saelens(tmp, f"blocks.{LAYER}.ln2.hook_normalized", "gpt2"), "pre_affine"),
    "saelens_llama": ("llama", "model.layers.1.post_attention_layernorm",
                      lambda tmp: _saelens(tmp, f"blocks.{LAYER}.ln2.hook_normalized", "meta-llama/Llama-3.1-8B"),
                      "pre_affine"),
    "gemma_scope_1_transcoder": ("gemma2", "model.layers.1.pre_feedforward_layernorm", _gemma_scope_1, "pre_affine"),
    "circuit_tracer_ln2_hook_normalized": ("gemma2", "model.layers.1.pre_feedforward_layernorm",
                                           lambda tmp: _circuit_tracer(tmp, "google/gemma-2-2b", "ln2.hook_normalized"),
                                           "pre_affine"),
    "circuit_tracer_default_mlp_hook_in": ("qwen3", "model.layers.1.post_attention_layernorm",
                                           lambda tmp: _circuit_tracer(tmp, "Qwen/Qwen3-4B", None), "output"),
    "gemma_scope_2_transcoder": ("gemma3_text", "model.layers.1.pre_feedforward_layernorm", _gemma_scope_2, "output"),
    "sparsify_transcoder_llama": ("llama", "model.layers.1.post_attention_layernorm",
                                  lambda tmp: _sparsify(tmp, f"layers.{LAYER}.mlp", "meta-llama/Llama-3.1-8B"), "output"),
    "sparsify_transcoder_no_model_name": ("gemma2", "model.layers.1.pre_feedforward_layernorm",
                                          lambda tmp: _sparsify(tmp, f"layers.{LAYER}.mlp", None), "output"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_format_site_reads_the_trained_tensor(case: str, tmp_path) -> None:  # noqa: ANN001
    family, norm_path, load, trained_on = CASES[case]
    model = _model(family)
    sae = load(tmp_path)
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(12))
    truth = _norm_tensors(model, norm_path, tokens)
    got = _read_input_torch(model, sae, tokens)
    torch.testing.assert_close(got, truth[trained_on], atol=1e-5, rtol=1e-5)


def test_sparsify_transcoder_replaces_the_mlp_module_output_on_gemma(tmp_path) -> None:  # noqa: ANN001
    """On Gemma the MLP module's output (what sparsify's hook replaces) is before the post-MLP norm: the loaded
    transcoder splices there, as a raw hook replacing the MLP's output by the transcoder of its input does."""
    from sae_hooks.adapters.torch import attach

    model = _model("gemma2")
    sae = _sparsify(tmp_path, f"layers.{LAYER}.mlp", None)
    tokens = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(13))
    truth_model = copy.deepcopy(model)
    truth_model.model.layers[LAYER].mlp.register_forward_hook(lambda m, args, out: sae(args[0]))
    with torch.no_grad():
        want, plain = truth_model(tokens).logits, model(tokens).logits
    assert (want - plain).abs().max() > 1e-2
    attached = attach(model)
    att = attached.add_sae(sae)
    assert att.sites_out == [f"blocks.{LAYER}.mlp.hook_out"]
    with torch.no_grad():
        torch.testing.assert_close(attached(tokens).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["saelens", "sparsify"])
def test_bridge_reads_the_same_tensor(case: str, tmp_path) -> None:  # noqa: ANN001
    """On a TransformerLens bridge over the same GPT-2 the loaded SAE reads the same tensor by its hook name."""
    from conftest import tl_major

    if (tl_major() or 0) < 4:
        pytest.skip("TransformerBridge needs TransformerLens 4")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    from sae_hooks.adapters.transformer_lens import attach

    hf = _model("gpt2")
    if case == "saelens":
        sae, trained_on = _saelens(tmp_path, f"blocks.{LAYER}.ln2.hook_normalized", "gpt2"), "pre_affine"
    else:
        sae, trained_on = _sparsify(tmp_path, f"h.{LAYER}.mlp", None), "output"
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(14))
    truth = _norm_tensors(hf, "transformer.h.1.ln_2", tokens)
    bridge = attach(build_bridge_from_module(copy.deepcopy(hf), "GPT2LMHeadModel", hf_config=hf.config))
    bridge.add_sae(sae)
    _, cache = bridge.run_with_cache(tokens)
    (x,) = [v for k, v in cache.items() if k.endswith(".hook_sae_input")]
    torch.testing.assert_close(x, truth[trained_on], atol=1e-5, rtol=1e-5)
