"""Copies, pickling and TransformerLens hook resets are safe (issue 10 item 5/6): a deep copy of a
torch-attached model is an independent attached model; other adapters refuse copies and pickling with a
typed error; ``reset_hooks(including_permanent=True)`` leaves no stale attachment and position filters
stay right. Truth: the SAE applied by hand in raw hooks."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.errors import SAEHooksError

SITE = "blocks.0.hook_resid_post"


def _sae():
    torch.manual_seed(11)
    s = make_sae("relu", 32, 48, sites=[SITE])
    with torch.no_grad():
        s.b_enc.normal_(0, 0.5)
    return s


def _splice(sae, x, zero=(), skip_first=False):
    """``decode(f') + (x - decode(f))`` with latents ``zero`` ablated; position 0 untouched if asked."""
    f = sae.encode(x)
    f_edit = f.clone()
    f_edit[..., list(zero)] = 0
    out = x + (f_edit - f) @ sae.W_dec
    if skip_first:
        out[:, 0] = x[:, 0]
    return out


def _hf_truth(hf, tokens, fn):
    def hook(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        return (fn(h), *o[1:]) if isinstance(o, tuple) else fn(h)

    handle = hf.transformer.h[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        handle.remove()


def test_deepcopy_of_torch_attached_model_is_independent(hf) -> None:
    pytest.importorskip("transformers")
    from sae_hooks.adapters.torch import attach

    sae = _sae()
    model = attach(copy.deepcopy(hf))
    tokens = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(12))
    x = {}
    h = hf.transformer.h[0].register_forward_hook(lambda m, a, o: x.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hf(tokens)
    h.remove()
    f = sae.encode(x["x"])
    firing = f.flatten(0, -2).gt(0).sum(0).argsort(descending=True)[:2].tolist()
    att = model.add_sae(sae, error_term=True, skip_positions=[0])
    att.ablate(firing[0])
    clone = copy.deepcopy(model)
    assert clone is not model and len(clone.sae_manager.attachments) == 1
    truth_one = _hf_truth(hf, tokens, lambda h: _splice(sae, h, [firing[0]], skip_first=True))
    att.ablate(firing[1])  # edit the original only
    truth_two = _hf_truth(hf, tokens, lambda h: _splice(sae, h, firing, skip_first=True))
    assert not torch.allclose(truth_one, truth_two, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(clone(tokens).logits, truth_one, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(tokens).logits, truth_two, atol=1e-5, rtol=1e-5)
    clone.reset_saes()  # detaching the copy leaves the original attached
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, truth_two, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clone(tokens).logits, _hf_truth(hf, tokens, lambda h: h), atol=1e-5, rtol=1e-5)
    assert len(model.sae_manager.attachments) == 1
    with pytest.raises(SAEHooksError, match="pickled"):
        pickle.dumps(model)


def test_other_adapters_refuse_copies_and_pickling_clearly(hf) -> None:
    from conftest import build_tl_model

    from sae_hooks.adapters.transformer_lens import attach

    model = attach(build_tl_model("bridge_native" if _tl4() else "hooked_transformer"))
    for op, what in ((copy.deepcopy, "deep-copied"), (pickle.dumps, "pickled")):
        with pytest.raises(SAEHooksError, match=what):
            op(model)
    nnsight = pytest.importorskip("nnsight")
    from sae_hooks.adapters.nnsight import attach as attach_nn

    envoy = attach_nn(nnsight.NNsight(copy.deepcopy(hf)))
    with pytest.raises(SAEHooksError, match="pickled"):
        pickle.dumps(envoy)


def _tl4() -> bool:
    from conftest import tl_major

    return (tl_major() or 0) >= 4


@pytest.mark.parametrize("kind", ["bridge_native", "hooked_transformer"])
def test_reset_hooks_including_permanent_leaves_nothing_stale(kind) -> None:
    from conftest import build_tl_model

    from sae_hooks.adapters.transformer_lens import attach

    model = build_tl_model(kind)
    sae = _sae()
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(13))
    longer = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        clean = model(tokens)
        truth = model.run_with_hooks(longer, fwd_hooks=[(SITE, lambda x, hook: _splice(sae, x, [0, 1, 2], skip_first=True))])
    model = attach(model)
    model.add_sae(sae, error_term=True).ablate([0, 1, 2])
    model.reset_hooks(including_permanent=True)
    assert not model.sae_manager.attachments
    assert f"{SITE}.hook_sae_acts_post" not in model.hook_dict
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), clean)
    # attaching again works, position filters included (the adapter's position tracking survived)
    model.add_sae(sae, error_term=True, skip_positions=[0]).ablate([0, 1, 2])
    with torch.no_grad():
        model(tokens)
        torch.testing.assert_close(model(longer), truth, atol=1e-5, rtol=1e-5)
    model.reset_hooks()  # the ordinary reset keeps the SAE (it lives in permanent hooks)
    assert len(model.sae_manager.attachments) == 1
