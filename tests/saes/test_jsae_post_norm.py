"""Gemma-family Jacobian pairs include the post-MLP norm (issue 10 item 7): with ``post_norm=`` the pair's MLP
function is ``post_feedforward_layernorm ∘ mlp``, so it maps the MLP input (``blocks.L.ln2.hook_out``) to
Gemma's ``hook_mlp_out``. Truths: the real Hugging Face modules (the frozen copy's outputs, and autograd
through them for the Jacobian on the active sets); on an attached model, the output SAE's own latents at
``hook_mlp_out`` (the Jacobian's output latents must be exactly those, on every token; without the norm
they were not)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import hf_family_cases, randomize_norms
from sae_hooks.errors import ConfigError
from sae_hooks.saes import JacobianSAEPair, make_jsae_pair
from sae_hooks.saes.jacobian import FrozenMLP
from sae_hooks.train.jsae import check_mlp_input

transformers = pytest.importorskip("transformers")
LAYER = 1


def _gemma(name: str = "gemma2") -> torch.nn.Module:
    cfg, cls, _ = hf_family_cases()[name]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    randomize_norms(model, seed=3)  # the post-MLP norm's scale is far from 1
    return model


def _randomize(pair: JacobianSAEPair, seed: int = 0) -> JacobianSAEPair:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sae in (pair.sae_in, pair.sae_out):
            for p in (sae.W_enc, sae.W_dec):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=g) * 0.1)
            sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g) * 0.1)
    return pair


def _pair(model: torch.nn.Module, post_norm: bool = True, seed: int = 1) -> JacobianSAEPair:
    layer = model.model.layers[LAYER]
    pair = make_jsae_pair(copy.deepcopy(layer.mlp), LAYER, 64, 6, seed=seed,
                          post_norm=layer.post_feedforward_layernorm if post_norm else None,
                          hook_in=None if post_norm else f"blocks.{LAYER}.ln2.hook_out")
    return _randomize(pair, seed)


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_frozen_mlp_with_post_norm_is_the_models_mlp_then_norm(name: str) -> None:
    model = _gemma(name)
    layer = model.model.layers[LAYER]
    pair = _pair(model)
    assert pair.mlp.post_norm and pair.mlp.gated
    assert (pair.cfg.hook_in, pair.cfg.hook_out) == (f"blocks.{LAYER}.ln2.hook_out", f"blocks.{LAYER}.hook_mlp_out")
    x = torch.randn(4, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(pair.mlp(x), layer.post_feedforward_layernorm(layer.mlp(x)), atol=1e-5, rtol=1e-5)
    tokens = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(5))
    assert check_mlp_input(model, pair, tokens) < 1e-4  # the pair's sites on the real model, by TL names


@pytest.mark.parametrize("at_reconstruction", [True, False])
def test_jacobian_with_post_norm_matches_autograd_through_the_real_modules(at_reconstruction: bool) -> None:
    model = _gemma()
    layer = copy.deepcopy(model.model.layers[LAYER]).double()
    pair = _pair(model).double()
    x = torch.randn(6, 32, dtype=torch.float64) * 2
    J = pair.jacobian(x, use_reconstruction=at_reconstruction)
    assert J.values.abs().max() > 1e-3

    def real(point: torch.Tensor) -> torch.Tensor:  # Gemma's MLP then its post-MLP norm, as the model runs them
        return layer.post_feedforward_layernorm(layer.mlp(point))

    # Through the real modules (whose norm casts to float32 inside: float32 agreement), and through the frozen
    # copy in float64 (the closed form exactly).
    torch.testing.assert_close(J.values, _autograd(pair, x, at_reconstruction, real), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(J.values, _autograd(pair, x, at_reconstruction, pair.mlp), rtol=1e-9, atol=1e-11)
    # Without the norm the Jacobian would be a different one (the norm's scale and RMS are not 1).
    plain = make_jsae_pair(FrozenMLP.from_module(layer.mlp), LAYER, 64, 6)
    plain.sae_in.load_state_dict(pair.sae_in.state_dict()), plain.sae_out.load_state_dict(pair.sae_out.state_dict())
    assert not torch.equal(plain.double().jacobian(x, use_reconstruction=at_reconstruction).out_indices, J.out_indices)


def _autograd(pair: JacobianSAEPair, x: torch.Tensor, at_reconstruction: bool, real) -> torch.Tensor:  # noqa: ANN001
    """Per token: autograd Jacobian of s_in -> decode -> real -> encode_out -> ReLU on the active sets."""
    J = pair.jacobian(x, use_reconstruction=at_reconstruction)
    truth = []
    for n in range(x.shape[0]):
        lat_in, _ = pair.sae_in.encode_with_state(x[n])
        x_hat0 = pair.sae_in.decode(lat_in)
        lat_out, _ = pair.sae_out.encode_with_state(real(x_hat0 if at_reconstruction else x[n]))
        I, O = lat_in.indices, lat_out.indices
        assert torch.equal(O, J.out_indices[n]) and torch.equal(I, J.in_indices[n])
        s0 = lat_in.to_dense()

        def f(active: torch.Tensor) -> torch.Tensor:
            s = s0.clone()
            s[I] = active
            x_hat = s @ pair.sae_in.W_dec + pair.sae_in.b_dec
            point = x_hat if at_reconstruction else x[n] + (x_hat - x_hat0)
            return torch.relu((real(point) @ pair.sae_out.W_enc + pair.sae_out.b_enc)[O])  # TopK set held fixed

        truth.append(torch.autograd.functional.jacobian(f, s0[I]))
    return torch.stack(truth)


def _output_latent_match(pa, cache_key: str, cache) -> float:  # noqa: ANN001
    """Fraction of tokens whose Jacobian output latents are exactly the output SAE's active latents."""
    acts = cache[cache_key]  # (batch, pos, d_sae) dense latents of the output SAE at hook_mlp_out
    active = acts.topk(pa.pair.sae_out.cfg.k, dim=-1).indices.sort(-1).values
    got = pa.jacobian.out_indices.sort(-1).values
    return (active == got).all(-1).float().mean().item()


def test_attached_pair_jacobian_latents_are_the_output_saes_latents() -> None:
    from sae_hooks.adapters.torch import attach
    from sae_hooks.intervene import attach_pair

    tokens = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(6))
    key = f"blocks.{LAYER}.hook_mlp_out.hook_sae_acts_post"
    matches = {}
    for with_norm in (True, False):
        model = attach(_gemma())
        pair = _pair(model, post_norm=with_norm)
        assert pair.cfg.hook_out == f"blocks.{LAYER}.hook_mlp_out"  # Gemma's: after the post-MLP norm
        with attach_pair(model, pair) as pa:
            with torch.no_grad(), model.sae_capture(key) as cache:
                model(tokens)
            matches[with_norm] = _output_latent_match(pa, key, cache)
    assert matches[True] == 1.0
    assert matches[False] < 0.9  # the old pair (no norm) disagreed with the attached output SAE


def test_attached_on_a_bridge_too() -> None:
    from conftest import tl_major

    if (tl_major() or 0) < 4:
        pytest.skip("TransformerBridge needs TransformerLens 4")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    from sae_hooks.adapters.transformer_lens import attach
    from sae_hooks.intervene import attach_pair

    hf = _gemma()
    pair = _pair(hf)
    bridge = attach(build_bridge_from_module(copy.deepcopy(hf), "Gemma2ForCausalLM", hf_config=hf.config))
    tokens = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(7))
    with attach_pair(bridge, pair) as pa:
        _, cache = bridge.run_with_cache(tokens)
        assert _output_latent_match(pa, f"blocks.{LAYER}.hook_mlp_out.hook_sae_acts_post", cache) == 1.0
    # The bridge's own modules make the same frozen MLP (its ln2_post is Gemma's post_feedforward_layernorm).
    block = bridge.blocks[LAYER]
    from_bridge = make_jsae_pair(block.mlp, LAYER, 16, 2, post_norm=block.ln2_post)
    x = torch.randn(3, 32)
    torch.testing.assert_close(from_bridge.mlp(x), pair.mlp(x), atol=1e-6, rtol=1e-6)


def test_save_load_keeps_the_post_norm(tmp_path) -> None:  # noqa: ANN001
    pair = _pair(_gemma())
    pair.save(tmp_path / "pair")
    back = JacobianSAEPair.load(tmp_path / "pair")
    assert back.mlp.post_norm and back.mlp.post_norm_offset == 1.0
    x = torch.randn(5, 32)
    torch.testing.assert_close(back.jacobian(x).values, pair.jacobian(x).values, atol=0, rtol=0)


def test_post_norm_must_be_an_rmsnorm() -> None:
    model = _gemma()
    layer = model.model.layers[LAYER]
    with pytest.raises(ConfigError, match="RMSNorm"):
        make_jsae_pair(layer.mlp, LAYER, 16, 2, post_norm=torch.nn.LayerNorm(32))
    with pytest.raises(ConfigError, match="FrozenMLP"):
        make_jsae_pair(FrozenMLP.from_module(layer.mlp), LAYER, 16, 2, post_norm=layer.post_feedforward_layernorm)
