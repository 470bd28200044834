"""Cross-adapter conformance: every intervention through every adapter gives the same numbers.

One randomly initialised HF GPT-2 is deep-copied into each wrapper — the TransformerLens 4
``TransformerBridge`` (``build_bridge_from_module``; it rewires the module in place), nnsight's
``TransformersModel`` and the plain torch adapter — and every result is compared (atol 1e-5) with an
independent truth: the SAE's equations written out by hand and applied with a raw forward hook on
another copy of the same HF module.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import attach_copy
from sae_hooks import make_sae

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
SITE = "blocks.0.hook_resid_post"
HF_SITE = ("transformer", "h", 0)
ADAPTERS = ["torch", "nnsight", "transformer_lens"]
LATENTS = [1, 5, 9]


# The model, the SAE and the inputs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(1)
    s = make_sae("relu", 32, 48, sites=[SITE])
    with torch.no_grad():
        s.W_enc.mul_(2.0)
        s.b_enc.normal_(0, 0.5)
        s.b_dec.normal_(0, 0.3)
    return s


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, 100, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    tokens[0, :3] = 0  # left padding on row 0
    mask[0, :3] = 0
    return tokens, mask


def _position_ids(mask):
    """Position ids counted from the first real token (nnsight derives these itself for left padding;
    passing them to every wrapper makes the underlying computation identical)."""
    return None if mask is None else (mask.long().cumsum(-1) - 1).clamp_min(0)


class Wrapped:
    """An adapter-wrapped model with a uniform ``logits(tokens, mask)`` / ``generate`` / ``latents``."""

    def __init__(self, kind: str, hf):
        self.kind = kind
        self.model = attach_copy(kind, hf, tokenizer=True)

    def logits(self, tokens, mask=None, *, latents: bool = False):
        """Logits ``(batch, seq, vocab)`` and, if asked, the SAE's dense latents at SITE."""
        m = self.model
        kw = dict(attention_mask=mask, position_ids=_position_ids(mask))
        key = f"{SITE}.hook_sae_acts_post"
        with torch.no_grad():
            if self.kind == "torch":
                with m.sae_capture(key) as cache:
                    out = m(tokens, **kw).logits
                return (out, cache[key]) if latents else out
            if self.kind == "nnsight":
                with m.trace(tokens, **kw):
                    if latents:
                        lat = m.sae_taps[SITE].hook_sae_acts_post.output.save()
                    out = m.output.logits.save()
                return (out, lat) if latents else out
            if latents:
                out, cache = m.run_with_cache(tokens, **kw)
                return out, cache[key]
            return m(tokens, **kw)

    def generate(self, tokens, n: int):
        m = self.model
        with torch.no_grad():
            if self.kind == "torch":
                return m.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
            if self.kind == "nnsight":
                with m.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n, do_sample=False,
                                pad_token_id=0) as tracer:
                    ids = tracer.result.save()
                return ids
            return m.generate(tokens, max_new_tokens=n, do_sample=False, verbose=False, stop_at_eos=False)


@pytest.fixture(scope="module")
def wrapped(hf):
    return {kind: Wrapped(kind, hf) for kind in ADAPTERS}


# The independent truth ---------------------------------------------------------------------------


def _encode(sae, x):
    return torch.relu(x @ sae.W_enc + sae.b_enc)


def _decode(sae, f):
    return f @ sae.W_dec + sae.b_dec


def truth(hf, tokens, mask, edit, *, generate_steps: int = 0):
    """Run a fresh copy of the HF model with ``edit(x, positions) -> x'`` applied at SITE by a raw hook.

    ``positions`` ``(batch, seq)`` are absolute positions of real tokens (left padding skipped).
    With ``generate_steps``, generate greedily without a KV cache (each step re-feeds the sequence).
    """
    hf = copy.deepcopy(hf)
    module = hf.transformer.h[0]
    state = {}

    def pre(mod, args, kwargs):
        m = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        m = torch.ones_like(ids) if m is None else m
        state["pos"] = m.long().cumsum(-1) - 1
        state["real"] = m.bool()

    def hook(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        new = edit(x, state["pos"][:, -x.shape[1]:], state["real"][:, -x.shape[1]:])
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handles = [hf.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(hook)]
    try:
        with torch.no_grad():
            if generate_steps:
                return hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=generate_steps,
                                   do_sample=False, use_cache=False, pad_token_id=0)
            return hf(tokens, attention_mask=mask, position_ids=_position_ids(mask)).logits
    finally:
        for h in handles:
            h.remove()


def _unit(sae, i):
    w = sae.W_dec[i]
    return w / w.norm()


# Interventions: (attach kwargs, edits on the attachment, truth edit) ------------------------------


def _cases(sae, means):
    S = torch.tensor(LATENTS)

    def with_latents(fn):
        def edit(x, pos, real):
            f = _encode(sae, x)
            x_hat = _decode(sae, f)
            return _decode(sae, fn(f.clone(), pos)) + (x - x_hat)
        return edit

    def zero(f, pos):
        f[..., S] = 0
        return f

    def mean(f, pos):
        f[..., S] = means[S]
        return f

    def clamp(f, pos):
        f[..., S] = 4.0
        return f

    def zero_at_1_3(f, pos):  # positions 1 and 3 counted from the first real token
        sel = ((pos == 1) | (pos == 3))[..., None]
        g = f.clone()
        g[..., S] = 0
        return torch.where(sel, g, f)

    steer_vec = 3.0 * _unit(sae, 7)
    return {
        "capture": (dict(splice=False), lambda a: None, lambda x, pos, real: x),
        "splice": (dict(), lambda a: None, lambda x, pos, real: _decode(sae, _encode(sae, x))),
        "splice_error": (dict(error_term=True), lambda a: None, lambda x, pos, real: x),
        "ablate_zero": (dict(error_term=True), lambda a: a.ablate(LATENTS), with_latents(zero)),
        "ablate_mean": (dict(error_term=True), lambda a: a.ablate(LATENTS, "mean", means=means), with_latents(mean)),
        "ablate_clamp": (dict(error_term=True), lambda a: a.clamp(LATENTS, 4.0), with_latents(clamp)),
        "steer": (dict(splice=False), lambda a: a.steer(7, 3.0), lambda x, pos, real: x + steer_vec),
        "positions_ablate": (dict(error_term=True), lambda a: a.ablate(LATENTS, positions=[1, 3]),
                             with_latents(zero_at_1_3)),
        "positions_skip": (dict(skip_positions=0), lambda a: None,
                           lambda x, pos, real: torch.where((pos == 0)[..., None], x, _decode(sae, _encode(sae, x)))),
        "positions_steer": (dict(splice=False), lambda a: a.steer(7, 3.0, positions=slice(2, None)),
                            lambda x, pos, real: x + ((pos >= 2) & real)[..., None] * steer_vec),
    }


@pytest.fixture(scope="module")
def means(hf, sae, inputs):
    tokens, _ = inputs
    with torch.no_grad():
        acts = {}
        h = hf.transformer.h[0].register_forward_hook(lambda m, a, o: acts.__setitem__("x", o))
        hf(tokens)
        h.remove()
        return _encode(sae, acts["x"]).mean((0, 1))


# Tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTERS)
def test_clean_wrapped_model_equals_hf(wrapped, hf, inputs, kind):
    """The wrappers (the bridge rewires the module) must not change the clean forward pass."""
    tokens, mask = inputs
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, position_ids=_position_ids(mask)).logits
    out = wrapped[kind].logits(tokens, mask)
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=ATOL)


CASES = ["capture", "splice", "splice_error", "ablate_zero", "ablate_mean", "ablate_clamp", "steer",
         "positions_ablate", "positions_skip", "positions_steer"]


@pytest.mark.parametrize("case", CASES)
def test_intervention_same_in_every_adapter(wrapped, hf, sae, inputs, means, case):
    tokens, mask = inputs
    attach_kwargs, apply_edits, edit = _cases(sae, means)[case]
    expected = truth(hf, tokens, mask, edit)
    real = mask.bool()
    with torch.no_grad():
        clean = hf(tokens, attention_mask=mask, position_ids=_position_ids(mask)).logits
    results, latents = {}, {}
    for kind in ADAPTERS:
        model = wrapped[kind].model
        with model.saes(sae, **attach_kwargs) as (att,):
            apply_edits(att)
            results[kind], latents[kind] = wrapped[kind].logits(tokens, mask, latents=True)
        assert not model.sae_manager.attachments
    for kind, out in results.items():
        err = (out[real] - expected[real]).abs().max().item()
        assert err < ATOL, f"{case}: {kind} differs from the truth by {err}"
    for kind in ADAPTERS[1:]:
        assert torch.allclose(results[kind][real], results[ADAPTERS[0]][real], atol=ATOL), f"{case}: {kind}"
        assert torch.allclose(latents[kind][real], latents[ADAPTERS[0]][real], atol=ATOL), f"{case}: {kind} latents"
    if case not in ("capture", "splice_error"):  # the intervention must do something, or the test proves nothing
        assert (expected[real] - clean[real]).abs().max() > 1e-3
    # Recorded latents are the (edited) latents of the real input.
    acts = {}
    h = hf.transformer.h[0].register_forward_hook(lambda m, a, o: acts.__setitem__("x", o))
    with torch.no_grad():
        hf(tokens, attention_mask=mask, position_ids=_position_ids(mask))
    h.remove()
    if case in ("capture", "splice", "splice_error", "steer"):
        assert torch.allclose(latents["torch"][real], _encode(sae, acts["x"])[real], atol=ATOL)


def test_generation_with_steering(wrapped, hf, sae):
    prompt = torch.tensor([[5, 17, 33]])
    n = 6
    steer_vec = 40.0 * _unit(sae, 7)
    expected = truth(hf, prompt, None, lambda x, pos, real: x + (pos >= 2)[..., None] * steer_vec,
                     generate_steps=n)
    unsteered = truth(hf, prompt, None, lambda x, pos, real: x, generate_steps=n)
    assert not torch.equal(expected, unsteered), "steering must change the greedy continuation"
    for kind in ADAPTERS:
        model = wrapped[kind].model
        with model.saes(sae, splice=False) as (att,):
            att.steer(7, 40.0, positions=slice(2, None))
            ids = wrapped[kind].generate(prompt, n)
        assert torch.equal(ids.cpu(), expected), f"{kind}: {ids.tolist()} != {expected.tolist()}"
        clean_ids = wrapped[kind].generate(prompt, n)
        assert torch.equal(clean_ids.cpu(), unsteered), f"{kind} (detached) {clean_ids.tolist()}"
