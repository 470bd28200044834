"""Cross-layer transcoders: both published layouts against circuit-tracer's own loaders (fixtures written and read
by circuit-tracer, scripts/make_clt_fixtures.py), and the multi-site attach against a hand-written forward-hook truth
on a tiny Hugging Face GPT-2 (torch adapter) and the TransformerLens bridge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_hooks.errors import SAEFormatError, SAEHooksError, ShapeMismatchError
from sae_hooks.hub import load_clt
from sae_hooks.saes.clt import CrossLayerTranscoder

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "clt"
FIX = json.loads((ROOT / "manifest.json").read_text())["fixtures"]
ATOL = 1e-5


@pytest.mark.parametrize("name", sorted(FIX))
def test_matches_circuit_tracer(name):
    f = FIX[name]
    clt = load_clt(ROOT / f.get("folder", name))
    g = load_file(str(ROOT / name / "golden.safetensors"))
    x = g["x"]  # (n_layers, n_pos, d_model)
    assert clt.n_layers == f["n_layers"] and (clt.threshold is not None) == f["jumprelu"]
    lat = torch.stack([clt.encode_layer(x[i], i) for i in range(clt.n_layers)])
    torch.testing.assert_close(lat, g["latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(clt(list(x))), g["out"], atol=ATOL, rtol=0)
    assert (lat > 0).float().mean() > 0.1  # non-trivial


def test_sites_per_layout(tmp_path):
    ct = load_clt(ROOT / "circuit_tracer_relu")
    assert ct.hooks_in == [f"blocks.{i}.hook_resid_mid" for i in range(3)]  # load_clt's defaults
    assert ct.hooks_out == [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    gs = load_clt(ROOT / FIX["gemma_scope_2_affine"]["folder"], model_name="google/gemma-3-1b-pt")
    assert gs.hooks_in[1] == "blocks.1.ln2.hook_out" and gs.W_skip is not None
    assert gs.modules_in[1] == "model.layers.1.pre_feedforward_layernorm"
    assert gs.modules_out[1] == "model.layers.1.post_feedforward_layernorm"
    # config.yaml beside circuit-tracer files sets the hooks
    for p in (ROOT / "circuit_tracer_relu").glob("W_*.safetensors"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "config.yaml").write_text("feature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n")
    assert load_clt(tmp_path).hooks_in[2] == "blocks.2.ln2.hook_normalized"


def test_bad_folders(tmp_path):
    with pytest.raises(SAEFormatError, match="no cross-layer transcoder layout"):
        load_clt(tmp_path)
    (tmp_path / "W_enc_1.safetensors").write_bytes((ROOT / "circuit_tracer_relu" / "W_enc_1.safetensors").read_bytes())
    with pytest.raises(SAEFormatError, match="numbered 0..n-1"):
        load_clt(tmp_path)


# Attach -------------------------------------------------------------------------------------------------------


def _random_clt(n: int, d: int, f: int, skip: bool, seed: int = 0) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=0.3: torch.randn(*s, generator=g) * sc  # noqa: E731
    return CrossLayerTranscoder(
        r(n, d, f), r(n, f, sc=0.1), [r(f, n - i, d) for i in range(n)], r(n, d, sc=0.1),
        threshold=torch.rand(n, f, generator=g) * 0.2, W_skip=r(n, d, d, sc=0.1) if skip else None,
        hooks_in=[f"blocks.{i}.ln2.hook_normalized" for i in range(n)],
        hooks_out=[f"blocks.{i}.hook_mlp_out" for i in range(n)],
    )


def _truth(hf, clt, tokens, error_term: bool):
    """Logits with hand-written forward hooks: ln_2's output is each MLP's input; each MLP's output replaced."""
    acts, xs, hs = {}, {}, []
    blocks = hf.transformer.h

    def grab(i):
        def hook(mod, inp, out):
            xs[i] = out
            pre = out @ clt.W_enc[i] + clt.b_enc[i]
            acts[i] = pre * (pre > clt.threshold[i])
        return hook

    def replace(j):
        def hook(mod, inp, out):
            y = clt.b_dec[j] + sum(acts[i] @ clt.W_dec[i][:, j - i] for i in range(j + 1))
            if clt.W_skip is not None:
                y = y + xs[j] @ clt.W_skip[j]
            return y + (out - y) if error_term else y
        return hook

    for i, b in enumerate(blocks):
        hs += [b.ln_2.register_forward_hook(grab(i)), b.mlp.register_forward_hook(replace(i))]
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        for h in hs:
            h.remove()


@pytest.mark.parametrize("skip", [False, True])
def test_attach_torch_adapter_matches_hand_hooks(skip):
    from conftest import tiny_hf_gpt2

    from sae_hooks.adapters.torch import attach

    hf = tiny_hf_gpt2(seed=1)
    for p in hf.parameters():  # non-default LayerNorm weights
        if p.dim() == 1:
            p.data.add_(torch.randn_like(p) * 0.2)
    clt = _random_clt(2, 32, 48, skip)
    tokens = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = hf(tokens).logits
    want = _truth(hf, clt, tokens, error_term=False)
    assert (want - plain).abs().max() > 1e-2  # the replacement changes the model
    model = attach(hf)
    att = model.add_sae(clt, site=["transformer.h.0.ln_2", "transformer.h.1.ln_2"],
                        site_out=["transformer.h.0.mlp", "transformer.h.1.mlp"])
    with torch.no_grad():
        got = model(tokens).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    att.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, plain, atol=0, rtol=0)  # no leaked hook
    with model.saes(clt, site=["transformer.h.0.ln_2", "transformer.h.1.ln_2"],
                    site_out=["transformer.h.0.mlp", "transformer.h.1.mlp"], error_term=True):
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, plain, atol=ATOL, rtol=0)


def test_attach_bridge_matches_hand_hooks():
    from conftest import build_tl_model

    from sae_hooks.adapters.transformer_lens import attach

    model = build_tl_model("bridge_hf")
    hf = model.original_model
    clt = _random_clt(2, 32, 48, skip=True, seed=5)
    tokens = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    want = _truth(hf, clt, tokens, error_term=False)
    model = attach(model)
    clt.hooks_in = [f"blocks.{i}.ln2.hook_out" for i in range(2)]  # the MLP input on a TL4 bridge
    att = model.add_sae(clt)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    lat = cache["blocks.1.ln2.hook_out.hook_sae_acts_post"]
    assert lat.shape == (2, 7, 48) and (lat > 0).any()
    with pytest.raises(SAEHooksError, match="not supported"):
        att.ablate(0)
    model.remove_sae(clt)
    assert not model.sae_manager.attachments


def test_attach_errors():
    from conftest import tiny_hf_gpt2

    from sae_hooks.adapters.torch import attach

    model = attach(tiny_hf_gpt2())
    clt = _random_clt(2, 32, 48, skip=False)
    with pytest.raises(SAEHooksError, match="one site per layer"):
        model.add_sae(clt, site=["transformer.h.0.ln_2"], site_out=["transformer.h.0.mlp", "transformer.h.1.mlp"])
    with pytest.raises(TypeError, match="skip_positions"):
        model.add_sae(clt, site=["transformer.h.0.ln_2", "transformer.h.1.ln_2"],
                      site_out=["transformer.h.0.mlp", "transformer.h.1.mlp"], skip_positions=[0])
    wide = _random_clt(2, 16, 8, skip=False)
    with pytest.raises(ShapeMismatchError):
        model.add_sae(wide, site=["transformer.h.0.ln_2", "transformer.h.1.ln_2"],
                      site_out=["transformer.h.0.mlp", "transformer.h.1.mlp"])


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "expected a mapping, got list"),  # main: AttributeError 'list' object has no attribute 'get'
    ("feature_input_hook: [1, 2]\n", "must be strings"),
    ("feature_input_hook: {\n", "cannot read"),
])
def test_bad_config_yaml_is_a_typed_error_naming_the_file(tmp_path, text, match):
    for p in (ROOT / "circuit_tracer_relu").glob("W_*.safetensors"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(SAEFormatError, match=match) as info:
        load_clt(tmp_path)
    assert "config.yaml" in str(info.value)
