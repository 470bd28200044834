"""Issue 11 SAEs (Feature/Mutual Choice, Matryoshka, signed TopK) attach in every adapter: capture, splice,
ablate and steer give the numbers of a raw forward hook applying the SAE's own equations by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import attach_copy, tiny_hf_gpt2
from sae_hooks import make_sae

transformers = pytest.importorskip("transformers")

SITE = "blocks.0.hook_resid_post"
ADAPTERS = ["torch", "nnsight", "transformer_lens"]
ATOL = 1e-5


def _wrap(kind, hf):
    return attach_copy(kind, hf, tokenizer=True)


def _run(kind, model, tokens):
    key = f"{SITE}.hook_sae_acts_post"
    with torch.no_grad():
        if kind == "torch":
            with model.sae_capture(key) as cache:
                out = model(tokens).logits
            return out, cache[key]
        if kind == "nnsight":
            with model.trace(tokens):
                lat = model.sae_taps[SITE].hook_sae_acts_post.output.save()
                out = model.output.logits.save()
            return out, lat
        out, cache = model.run_with_cache(tokens)
        return out, cache[key]


def _truth(hf, tokens, edit):
    hf = copy.deepcopy(hf)
    h = hf.transformer.h[0].register_forward_hook(
        lambda m, a, o: (edit(o[0]), *o[1:]) if isinstance(o, tuple) else edit(o))
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        h.remove()


def _make(arch: str):
    torch.manual_seed(3)
    extra = {"matryoshka_widths": [8, 24]} if arch == "matryoshka" else {}
    sae = make_sae(arch, 32, 48, k=4, sites=[SITE], **extra)
    with torch.no_grad():
        sae.W_enc.mul_(2.0)
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape) * 0.5 + 0.2)
    return sae


def _encode(sae, x):
    """The SAE's equations by hand."""
    pre = x @ sae.W_enc + sae.b_enc
    if sae.cfg.architecture == "signed_topk":
        idx = pre.abs().topk(sae.cfg.k, dim=-1).indices
        return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    return torch.relu(pre) * (pre > sae.threshold)


ARCHS = ["feature_choice", "mutual_choice", "matryoshka", "signed_topk"]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_gpt2()


@pytest.fixture(scope="module")
def wrapped(hf):
    return {kind: _wrap(kind, hf) for kind in ADAPTERS}


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_splice_ablate_steer_in_every_adapter(hf, wrapped, arch):
    sae = _make(arch)
    tokens = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    dec = lambda f: f @ sae.W_dec + sae.b_dec  # noqa: E731
    with torch.no_grad():
        acts = {}
        h = hf.transformer.h[0].register_forward_hook(lambda m, a, o: acts.__setitem__("x", o[0] if isinstance(o, tuple) else o))
        hf(tokens)
        h.remove()
        f_ref = _encode(sae, acts["x"])
    live = (f_ref != 0).any(0).any(0).nonzero().flatten()
    assert live.numel() >= 2, "the SAE must fire for the test to mean anything"
    S = live[:2].tolist()
    unit = sae.W_dec[S[0]] / sae.W_dec[S[0]].norm()

    def ablated(x):
        f = _encode(sae, x)
        g = f.clone()
        g[..., S] = 0
        return dec(g) + (x - dec(f))

    cases = {
        "splice": (dict(), lambda a: None, lambda x: dec(_encode(sae, x))),
        "ablate": (dict(error_term=True), lambda a: a.ablate(S), ablated),
        "steer": (dict(splice=False), lambda a: a.steer(S[0], 3.0), lambda x: x + 3.0 * unit),
    }
    with torch.no_grad():
        for name, (kwargs, edits, edit) in cases.items():
            expected = _truth(hf, tokens, edit)
            for kind in ADAPTERS:
                model = wrapped[kind]
                with model.saes(sae, **kwargs) as (att,):
                    edits(att)
                    out, lat = _run(kind, model, tokens)
                assert not model.sae_manager.attachments
                err = (out - expected).abs().max().item()
                assert err < ATOL, f"{arch} {name}: {kind} differs from the hand-written hook by {err}"
                if name == "splice":
                    torch.testing.assert_close(lat, f_ref, atol=ATOL, rtol=1e-5)
