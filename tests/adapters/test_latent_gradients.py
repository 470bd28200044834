"""Gradients with respect to recorded SAE latents (issue 10 item 1): TopK latents recorded with
``detach=False`` are in the autograd graph (torch adapter), and a backward hook alone on
``hook_sae_acts_post`` fires (TL bridge / HookedTransformer). Truth: autograd through the SAE's equations
written by hand with the dense latents as a leaf."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_hooks import make_sae

SITE = "blocks.0.hook_resid_post"
KEY = f"{SITE}.hook_sae_acts_post"


def _sae(arch):
    torch.manual_seed(21)
    s = make_sae(arch, 32, 48, sites=[SITE], **({"k": 5} if arch == "topk" else {}))
    with torch.no_grad():
        s.b_enc.normal_(0, 0.3)
    return s


def _metric(logits):
    return logits[:, -1, :7].logsumexp(-1).sum()


def _truth_grad(run_with_hook, sae, splice_fn_site_output):
    """d metric / d f for the dense latents f at the site, with the SAE spliced with its error term."""
    grads = {}

    def fn(x):
        f = sae.encode(x.detach()).detach().requires_grad_(True)
        grads["f"] = f
        x_hat = f @ sae.W_dec + sae.b_dec
        return x_hat + (x - x_hat).detach()

    _metric(run_with_hook(fn)).backward()
    return grads["f"].grad


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_torch_adapter_latents_recorded_with_grad_are_in_the_graph(hf, arch) -> None:
    pytest.importorskip("transformers")
    from sae_hooks.adapters.torch import attach

    sae = _sae(arch)
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(22))
    bare = copy.deepcopy(hf)

    def run_with_hook(fn):
        def hook(m, a, o):
            h = o[0] if isinstance(o, tuple) else o
            return (fn(h), *o[1:]) if isinstance(o, tuple) else fn(h)
        handle = bare.transformer.h[0].register_forward_hook(hook)
        try:
            return bare(tokens).logits
        finally:
            handle.remove()

    truth = _truth_grad(run_with_hook, sae, None)
    model = attach(copy.deepcopy(hf))
    model.add_sae(sae, error_term=True)
    with model.sae_capture(KEY, detach=False) as cache:
        logits = model(tokens).logits
    (grad,) = torch.autograd.grad(_metric(logits), cache[KEY])
    torch.testing.assert_close(grad, truth, atol=1e-5, rtol=1e-4)
    assert grad.abs().sum() > 0
    with torch.no_grad():  # and the forward value is unchanged by the graph plumbing
        torch.testing.assert_close(model(tokens).logits, hf(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bridge_native", "hooked_transformer"])
@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_tl_backward_hook_alone_on_latents_fires_with_the_right_gradient(kind, arch) -> None:
    from conftest import build_tl_model

    from sae_hooks.adapters.transformer_lens import attach

    model = build_tl_model(kind)
    sae = _sae(arch)
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(23))

    def run_with_hook(fn):
        return model.run_with_hooks(tokens, fwd_hooks=[(SITE, lambda x, hook: fn(x))])

    truth = _truth_grad(run_with_hook, sae, None)
    model.zero_grad()
    model = attach(model)
    model.add_sae(sae, error_term=True)
    got = {}

    def bwd(grad, hook):
        got["g"] = grad.detach().clone()

    model.add_hook(KEY, bwd, dir="bwd")
    try:
        _metric(model(tokens)).backward()
    finally:
        model.reset_hooks()
    assert "g" in got, "the backward hook was never called"
    torch.testing.assert_close(got["g"], truth, atol=1e-5, rtol=1e-4)
