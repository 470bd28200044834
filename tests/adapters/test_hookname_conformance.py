"""One meaning per hook name (issue 10 item 2): every TransformerLens name the torch/nnsight site layer
translates reads AND writes the same tensor as on a TransformerLens 4 bridge over the same module, on every
family, with random non-trivial norm weights and biases (pre- and post-affine values differ).

Truth: the bridge itself (``run_with_cache`` for reads, ``run_with_hooks`` for writes).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.sites import ModuleSites
from sae_hooks.sites.names import hook_names

transformers = pytest.importorskip("transformers")
bridge_builder = pytest.importorskip("transformer_lens.model_bridge.sources._bridge_builder")

from conftest import hf_family_cases as _cases, randomize_norms  # noqa: E402

FAMILIES = list(_cases())


def _build(name):
    cfg, cls, arch = _cases()[name]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    randomize_norms(hf, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = bridge_builder.build_bridge_from_module(copy.deepcopy(hf), arch, hf_config=cfg)
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    return hf, bridge, tokens


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _edit(x):
    return x * 0.5 + 0.1 * x * x  # elementwise and not undone by a following norm (unlike a scale or shift)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_translated_name_reads_and_writes_what_the_bridge_does(name) -> None:
    hf, bridge, tokens = _build(name)
    sites = ModuleSites(hf)
    n_layers = hf.config.num_hidden_layers
    names = [n for n in hook_names(sites.family, n_layers) if n in bridge.hook_dict]
    assert any(n.endswith("ln1.hook_normalized") for n in names) and any(n.endswith("ln1.hook_out") for n in names)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
    # reads
    got, removers = {}, []
    for n in names:
        removers.append(sites.install(n, lambda x, n=n: got.__setitem__(n, x) if n not in got else None))
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for r in removers:
            r()
    bad = []
    for n in names:
        expected, actual = cache[n], got[n]
        if actual.shape != expected.shape:
            actual = actual.expand_as(expected) if actual.shape[0] == 1 else actual.view(expected.shape)
        if not torch.allclose(actual.float(), expected.float(), atol=1e-5):
            bad.append((n, (actual.float() - expected.float()).abs().max().item()))
    assert not bad, f"{name}: reads differ {bad}"
    # writes: each layer-0 and global name edited alone; the logits must match the bridge's
    bad = []
    with torch.no_grad():
        clean = _logits(hf(tokens))
    edited = [n for n in names if not n.startswith("blocks.1.")]
    assert len(edited) >= 12, edited
    for n in edited:
        remove = sites.install(n, _edit)
        try:
            with torch.no_grad():
                ours = _logits(hf(tokens))
        finally:
            remove()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = _logits(bridge.run_with_hooks(tokens, fwd_hooks=[(n, lambda x, hook: _edit(x))]))
        if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4) or torch.allclose(ours, clean, atol=1e-5, rtol=0):
            bad.append((n, (ours - theirs).abs().max().item(), (ours - clean).abs().max().item()))
    assert not bad, f"{name}: writes differ {bad}"


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
def test_sae_on_hook_normalized_agrees_between_torch_and_bridge_adapters(name) -> None:
    from sae_hooks.adapters.torch import attach as attach_torch
    from sae_hooks.adapters.transformer_lens import attach as attach_tl

    hf, bridge, tokens = _build(name)
    site = "blocks.0.ln2.hook_normalized"
    torch.manual_seed(4)
    sae = make_sae("relu", hf.config.hidden_size, 48, sites=[site])
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    hf, bridge = attach_torch(hf), attach_tl(bridge)
    hf.add_sae(sae)
    bridge.add_sae(sae)
    key = f"{site}.hook_sae_acts_post"
    with torch.no_grad(), hf.sae_capture() as cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _logits(hf(tokens))
        theirs, tl_cache = bridge.run_with_cache(tokens)
    torch.testing.assert_close(cache[key], tl_cache[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, _logits(theirs), atol=1e-4, rtol=1e-4)
