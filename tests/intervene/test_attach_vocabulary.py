"""One vocabulary in the attach API (issue 9 item 7, issue 10 item 8): ``site``/``hook=``, ``error_term``/
``use_error_term=``, ``saes=``, one meaning of ``splice`` for single SAEs, multi-site SAEs and pairs, and
unknown keywords raise. Truth: raw forward hooks on an unwrapped copy of the model applying the SAE by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.intervene import PairAttachment, attach_pair, pair_attached

pytest.importorskip("transformers")
from sae_hooks.adapters.torch import attach  # noqa: E402

SITE = "blocks.0.hook_resid_post"
KEY = f"{SITE}.hook_sae_acts_post"


@pytest.fixture
def model(hf):
    return attach(copy.deepcopy(hf))


def _tokens():
    return torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def _by_hand(hf, tokens, edits: dict):
    """Logits of ``hf`` with ``{block index: fn(hidden) -> hidden}`` applied by raw forward hooks, plus
    the hidden states each block produced before the edit."""
    seen, handles = {}, []
    for i, block in enumerate(hf.transformer.h):
        def hook(m, a, o, i=i, fn=edits.get(i)):
            h = o[0] if isinstance(o, tuple) else o
            seen[i] = h
            if fn is None:
                return None
            return (fn(h), *o[1:]) if isinstance(o, tuple) else fn(h)
        handles.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return hf(tokens).logits, seen
    finally:
        for h in handles:
            h.remove()


def test_saes_keyword_as_saelens_spells_it_attaches(model, hf, sae) -> None:
    tokens = _tokens()
    truth, seen = _by_hand(hf, tokens, {0: lambda h: sae(h)})
    with model.saes(saes=[sae]) as atts:
        assert len(atts) == 1 and len(model.sae_manager.attachments) == 1
        with model.sae_capture() as cache, torch.no_grad():
            logits = model(tokens).logits
    torch.testing.assert_close(logits, truth)
    torch.testing.assert_close(cache[KEY], sae.encode(seen[0]))
    assert not model.sae_manager.attachments
    with model.saes(saes=sae, use_error_term=True), torch.no_grad():  # one SAE, SAELens's error-term spelling
        torch.testing.assert_close(model(tokens).logits, _by_hand(hf, tokens, {})[0])


def test_unknown_keywords_raise_and_attach_nothing(model, sae) -> None:
    with pytest.raises(TypeError, match="sae_list"):
        with model.saes(sae_list=[sae]):
            pass
    with pytest.raises(TypeError, match="errorterm"):
        with model.saes(sae, errorterm=True):
            pass
    with pytest.raises(TypeError, match="bogus"):
        model.add_sae(sae, bogus=1)
    with pytest.raises(TypeError, match="at least one SAE"):
        with model.saes():
            pass
    with pytest.raises(TypeError, match="jacobian"):  # pair-only options are refused for a plain SAE
        model.add_sae(sae, jacobian=True)
    assert not model.sae_manager.attachments
    assert sum(len(m._forward_hooks) for m in model.transformer.h.modules()) == 0


def test_site_and_hook_alias(model, hf, sae) -> None:
    tokens = _tokens()
    truth, _ = _by_hand(hf, tokens, {0: lambda h: sae(h)})
    for kwargs in ({"site": "transformer.h.0"}, {"hook": "transformer.h.0"}):
        with model.add_sae(sae, **kwargs), torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, truth)
    with pytest.raises(TypeError, match="alias"):
        model.add_sae(sae, site=SITE, hook="blocks.1.hook_resid_post")
    with pytest.raises(TypeError, match="alias"):
        model.add_sae(sae, error_term=True, use_error_term=False)
    assert not model.sae_manager.attachments


def test_splice_chooses_sites_of_a_multi_site_sae(model, hf) -> None:
    torch.manual_seed(5)
    ml = make_sae("relu", 32, 40, sites=[SITE, "blocks.1.hook_resid_post"])
    tokens = _tokens()
    # spliced at block 1 only, recorded at block 0
    truth, seen = _by_hand(hf, tokens, {1: lambda h: ml(h)})
    with model.add_sae(ml, splice=["transformer.h.1"]) as att, model.sae_capture() as cache, torch.no_grad():
        logits = model(tokens).logits
        assert "record" in repr(att) and "splice" in repr(att)
    torch.testing.assert_close(logits, truth)
    torch.testing.assert_close(cache[KEY], ml.encode(seen[0]))
    torch.testing.assert_close(cache["blocks.1.hook_resid_post.hook_sae_acts_post"], ml.encode(seen[1]))
    with pytest.raises(ValueError, match="not attached at"):
        model.add_sae(ml, splice="blocks.0.hook_resid_pre")
    assert not model.sae_manager.attachments


def _pair():
    from sae_hooks.saes import make_jsae_pair
    from conftest import tiny_hf_gpt2

    hf = tiny_hf_gpt2()
    return make_jsae_pair(hf.transformer.h[0].mlp, 0, d_sae=64, k=6, hook_in="transformer.h.0.mlp:input",
                          hook_out="blocks.0.hook_mlp_out", seed=0)


def test_pair_attaches_through_the_manager_with_add_sae_meaning_of_splice(model, hf) -> None:
    pair = _pair()
    tokens = _tokens()
    mlp = hf.transformer.h[0].mlp
    got = {}
    h = mlp.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0]))
    with torch.no_grad():
        clean = hf(tokens).logits
    h.remove()
    x = got["x"]
    # splice=True (add_sae's default): the MLP input is the input SAE's reconstruction, the output the
    # output SAE's reconstruction; independent truth: raw hooks doing the same on the unwrapped model
    pre = mlp.register_forward_pre_hook(lambda m, a: (pair.sae_in(a[0]),))
    post = mlp.register_forward_hook(lambda m, a, o: pair.sae_out(o))
    with torch.no_grad():
        truth = hf(tokens).logits
    pre.remove(), post.remove()
    pa = model.add_sae(pair)
    assert isinstance(pa, PairAttachment) and len(model.sae_manager.attachments) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, truth)
    torch.testing.assert_close(pa.jacobian.values, pair.jacobian(x).values)  # at the true MLP input
    model.remove_sae(pair)  # removing the pair removes both SAEs and the Jacobian hook
    assert not model.sae_manager.attachments
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.transformer.h.modules()) == 0
    # attach_pair records by default; "in" names the pair's input site (same meaning as a site name)
    with attach_pair(model, pair) as pa, torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, clean)
    for spec in ("in", "transformer.h.0.mlp:input", ["in"]):
        with pair_attached(model, pair, splice=spec, jacobian=False), model.sae_capture() as cache, torch.no_grad():
            model(tokens)
        torch.testing.assert_close(cache["blocks.0.hook_mlp_out.hook_sae_input"], mlp(pair.sae_in(x)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="splice=False/True"):
        attach_pair(model, pair, splice="none")
    with pytest.raises(TypeError, match="site="):
        model.add_sae(pair, site=SITE)
    assert not model.sae_manager.attachments
