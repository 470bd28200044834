"""Attribution through SAE latents (issue 10 item 1): ``attribute(model, metric, tokens, saes=...)``.

Truths: autograd through the SAE's equations written by hand (activation × gradient), the real effect of
zero-ablating each latent (the first-order estimate must track it), and completeness of integrated
gradients against the metric at both ends of the path computed with raw hooks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.intervene import attribute

pytest.importorskip("transformers")
from sae_hooks.adapters.torch import attach  # noqa: E402

SITE = "blocks.0.hook_resid_post"


def _sae(arch):
    torch.manual_seed(31)
    s = make_sae(arch, 32, 64, sites=[SITE], **({"k": 6} if arch == "topk" else {}))
    with torch.no_grad():
        s.b_enc.normal_(0, 0.3)
        s.b_dec.normal_(0, 0.2)
    return s


def _metric(out):
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, -1, 3].sum() - logits[:, -1, 4].sum()


TOKENS = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(32))


def _run_hooked(hf, fn):
    def hook(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        return (fn(h), *o[1:]) if isinstance(o, tuple) else fn(h)

    handle = hf.transformer.h[0].register_forward_hook(hook)
    try:
        return hf(TOKENS)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_attribution_patching_equals_activation_times_autograd(hf, arch) -> None:
    sae = _sae(arch)
    bare = copy.deepcopy(hf)
    kept = {}

    def by_hand(x):
        f = sae.encode(x.detach()).detach().requires_grad_(True)
        x_hat = f @ sae.W_dec + sae.b_dec
        e = (x - x_hat).detach().requires_grad_(True)
        kept["f"], kept["e"] = f, e
        return x_hat + e

    _metric(_run_hooked(bare, by_hand)).backward()
    model = attach(copy.deepcopy(hf))
    scores = attribute(model, _metric, TOKENS, saes=[sae])[SITE]
    assert not model.sae_manager.attachments  # attached for the call only
    torch.testing.assert_close(scores.latents, kept["f"] * kept["f"].grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores.error, (kept["e"] * kept["e"].grad).sum(-1), atol=1e-5, rtol=1e-4)
    assert scores.latents.abs().sum() > 0


def test_first_order_estimate_tracks_real_ablation_effects(hf) -> None:
    sae = _sae("relu")
    with torch.no_grad():  # decoder rows at the scale of this tiny model's residual stream (norm ~0.1), so
        sae.W_dec.mul_(0.05)  # that one ablation is a small perturbation: the regime a first-order estimate is for
    model = attach(copy.deepcopy(hf))
    scores = attribute(model, _metric, TOKENS, saes=sae)[SITE]
    per_latent = scores.latents.sum((0, 1))  # ablating a latent at every position
    top = per_latent.abs().argsort(descending=True)[:12].tolist()
    with torch.no_grad():
        with model.saes(sae, error_term=True):
            base = _metric(model(TOKENS)).item()
        real = []
        for i in top:
            with model.saes(sae, error_term=True) as (att,):
                att.ablate(i)
                real.append(_metric(model(TOKENS)).item() - base)
    estimate = -per_latent[top]
    real = torch.tensor(real)
    corr = torch.corrcoef(torch.stack([estimate, real]))[0, 1]
    assert corr > 0.95, (estimate, real)
    assert (torch.sign(estimate[:5]) == torch.sign(real[:5])).all()


def test_integrated_gradients_completeness(hf) -> None:
    sae = _sae("topk")
    model = attach(copy.deepcopy(hf))
    scores = attribute(model, _metric, TOKENS, saes=[sae], method="ig", steps=128)[SITE]
    bare = copy.deepcopy(hf)
    with torch.no_grad():
        full = _metric(bare(TOKENS)).item()
        start = _metric(_run_hooked(bare, lambda x: sae.b_dec.expand_as(x))).item()  # α = 0: decoder bias only
    total = scores.latents.sum().item() + scores.error.sum().item()
    assert abs(full - start) > 1e-3
    assert abs(total - (full - start)) < 0.02 * abs(full - start) + 1e-4, (total, full - start)


def test_attribution_agrees_across_adapters(hf) -> None:
    from conftest import tl_major

    sae = _sae("relu")
    ref = attribute(attach(copy.deepcopy(hf)), _metric, TOKENS, saes=[sae])[SITE]
    others = []
    nnsight = pytest.importorskip("nnsight")
    from sae_hooks.adapters.nnsight import attach as attach_nn

    others.append(attach_nn(nnsight.NNsight(copy.deepcopy(hf))))
    if (tl_major() or 0) >= 4:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        from sae_hooks.adapters.transformer_lens import attach as attach_tl

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            others.append(attach_tl(build_bridge_from_module(copy.deepcopy(hf), "GPT2LMHeadModel", hf_config=hf.config)))
    for model in others:
        got = attribute(model, _metric, TOKENS, saes=[sae])[SITE]
        torch.testing.assert_close(got.latents, ref.latents, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.error, ref.error, atol=1e-5, rtol=1e-4)
