"""Hook-name translation: the tensor at a TransformerLens name on a ``TransformerBridge`` equals the tensor
at the translated module path on the same (randomly initialised) Hugging Face module.

The HF side is read with raw PyTorch hooks written here (not the adapter's code), so the translation
table is checked against an independent truth.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from sae_hooks.errors import HookNotFoundError
from sae_hooks.sites.names import (
    FAMILIES,
    complete_site,
    detect_family,
    for_config,
    hook_names,
    join_site,
    split_site,
    to_hook_name,
    to_module_path,
)

transformers = pytest.importorskip("transformers")
bridge_builder = pytest.importorskip("transformer_lens.model_bridge.sources._bridge_builder")

from conftest import SMALL, hf_family_cases as _cases, randomize_norms  # noqa: E402


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise AssertionError(f"no tensor in {type(value)}")


def _normalized(mod, x):
    """Pre-affine normalised value of a norm's input, computed here independently: ``F.layer_norm`` without
    weight and bias for a LayerNorm, ``x * rsqrt(mean(x²) + eps)`` for an RMSNorm (float32)."""
    x = x.float()
    eps = getattr(mod, "eps", None) or getattr(mod, "variance_epsilon", None)
    if isinstance(mod, torch.nn.LayerNorm):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=mod.eps)
    assert "RMSNorm" in type(mod).__name__, type(mod)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _hf_tensors(model, sites: list[str], tokens):
    """Run ``model`` with raw forward hooks; return ``{site: tensor}`` (first tensor of output / input)."""
    modules = dict(model.named_modules())
    got, handles = {}, []
    for site in sites:
        path, side = split_site(site)
        mod = modules[path]
        if side == "normalized":
            def norm_pre(m, args, kwargs, s=site):
                got[s] = _normalized(m, args[0] if args else kwargs["hidden_states"])
            handles.append(mod.register_forward_pre_hook(norm_pre, with_kwargs=True))
        elif side == "output":
            handles.append(mod.register_forward_hook(lambda m, a, o, s=site: got.__setitem__(s, _first_tensor(o))))
        else:
            def pre(m, args, kwargs, s=site):
                got[s] = args[0] if args else kwargs["hidden_states"]
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.fixture(scope="module")
def built():
    """One (hf_model, bridge, cache) per family, built lazily."""
    store = {}

    def get(name):
        if name not in store:
            cfg, cls, arch = _cases()[name]
            torch.manual_seed(0)
            hf = cls(cfg).eval()
            randomize_norms(hf)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bridge = bridge_builder.build_bridge_from_module(copy.deepcopy(hf), arch, hf_config=cfg)
            tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                _, cache = bridge.run_with_cache(tokens)
            store[name] = hf, bridge, cache, tokens
        return store[name]

    return get


# Names that must translate for every family (the test fails if the bridge lacks them, so the
# comparison can't pass vacuously).
CORE = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.0.hook_attn_out",
        "blocks.1.hook_mlp_out"]


@pytest.mark.parametrize("name", list(_cases()))
def test_translated_paths_match_bridge(built, name):
    hf, bridge, cache, tokens = built(name)
    fam = detect_family([n for n, _ in hf.named_modules()], hf.config.model_type)
    assert fam is not None
    fam = for_config(fam, hf.config)
    n_layers = hf.config.num_hidden_layers
    names = [n for n in hook_names(fam, n_layers) if n in cache]
    missing_core = [n for n in CORE if n not in names]
    assert not missing_core, f"bridge lacks {missing_core}"
    sites = {n: join_site(*to_module_path(n, fam)) for n in names}
    hf_vals = _hf_tensors(hf, list(set(sites.values())), tokens)
    bad = []
    for tl_name, site in sites.items():
        expected = cache[tl_name]
        actual = hf_vals[site]
        if actual.shape[0] == 1 and expected.shape[0] > 1:
            actual = actual.expand(expected.shape[0], *actual.shape[1:])  # position embeddings broadcast
        if expected.shape != actual.shape:
            expected = expected.flatten(-2)  # hook_z: (..., n_heads, d_head) vs the flat projection input
        if expected.shape != actual.shape or not torch.allclose(expected, actual, atol=1e-5):
            bad.append((tl_name, site, (expected - actual).abs().max().item() if expected.shape == actual.shape else "shape"))
    assert not bad, f"{name}: mismatches {bad}"
    assert len(names) >= len(CORE)
    if name == "gpt_neox_sequential":
        assert "blocks.1.hook_resid_mid" in names


@pytest.mark.parametrize("name", list(_cases()))
def test_family_detection_from_tree_and_model_type(name):
    cfg, cls, _ = _cases()[name]
    torch.manual_seed(0)
    model = cls(cfg)
    names = [n for n, _ in model.named_modules()]
    by_type = detect_family(names, cfg.model_type)
    by_tree = detect_family(names)
    assert by_type is not None and by_tree is not None
    assert by_type.name == by_tree.name
    assert by_type.layers in dict(model.named_modules())


def test_base_model_prefix_is_stripped():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL)
    base = transformers.GPT2Model(cfg)
    fam = detect_family([n for n, _ in base.named_modules()], "gpt2")
    assert fam.layers == "h"
    assert to_module_path("blocks.1.hook_resid_post", fam) == ("h.1", "output")
    assert to_module_path("hook_embed", fam) == ("wte", "output")
    assert to_hook_name("h.0:input", fam) == "blocks.0.hook_resid_pre"


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_round_trip(fam):
    for name in hook_names(fam, 3):
        path, side = to_module_path(name, fam)
        back = to_hook_name(join_site(path, side), fam)
        # Several names may share a site (bert's hook_attn_out / attn.hook_z are different sides, fine).
        assert to_module_path(back, fam) == (path, side)


def test_examples_and_errors():
    assert to_module_path("blocks.3.hook_resid_post", "gpt2") == ("transformer.h.3", "output")
    assert to_module_path("blocks.3.hook_resid_pre", "qwen3") == ("model.layers.3", "input")
    assert to_hook_name("model.layers.3.post_attention_layernorm:input", "llama") == "blocks.3.hook_resid_mid"
    assert to_hook_name("transformer.h.3.attn.c_attn", "gpt2") is None
    with pytest.raises(HookNotFoundError, match="hook_resid_post"):
        to_module_path("blocks.3.hook_resid_psot", "gpt2")
    with pytest.raises(HookNotFoundError, match="gpt_neox"):
        to_module_path("blocks.0.hook_resid_mid", "gpt_neox")  # parallel residual: no resid_mid
    with pytest.raises(HookNotFoundError, match="family"):
        to_module_path("blocks.0.hook_resid_post", "opt")
    with pytest.raises(HookNotFoundError, match=":input"):
        split_site("transformer.h.0:inptu")


def test_complete_site_fills_both_spellings():
    from sae_hooks import Site

    assert complete_site(Site(hook="blocks.2.hook_resid_pre"), "llama") == Site(
        hook="blocks.2.hook_resid_pre", module="model.layers.2:input")
    assert complete_site(Site(module="transformer.h.1.mlp"), "gpt2") == Site(
        hook="blocks.1.hook_mlp_out", module="transformer.h.1.mlp")
    assert complete_site(Site(module="transformer.h.1.attn.c_attn"), "gpt2").hook is None
