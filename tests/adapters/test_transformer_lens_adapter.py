"""TransformerLens adapter, checked against plain TransformerLens hooks that apply the SAE by hand.

Runs on a TL 4 ``TransformerBridge`` (``boot_native`` and a bridge over a random HF GPT-2) and, in the
TL 3.x environment that ``.ci/run`` builds, on a legacy ``HookedTransformer``.
"""

from __future__ import annotations

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.errors import HookNotFoundError, ShapeMismatchError

from conftest import TL_KINDS, build_tl_model

HOOK = "blocks.0.hook_resid_post"
D = 32
ATOL = 1e-5


@pytest.fixture(params=TL_KINDS)
def model(request):
    from sae_hooks.adapters.transformer_lens import attach

    model = attach(build_tl_model(request.param))
    model.__dict__["_hooks_before_any_sae"] = hooks_attached(model)  # the adapter's own context hook
    return model


def random_sae(arch="topk", seed=0, **kw):
    torch.manual_seed(seed)
    sae = make_sae(arch, D, 64, sites=[{"hook": HOOK}], **({"k": 4} if arch == "topk" else {}), **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1) if hasattr(sae, "b_enc") else None
        sae.b_dec.normal_(0, 0.1)
    return sae


def tokens(batch=2, seq=7, seed=0):
    return torch.randint(1, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hooks_attached(model) -> int:
    return sum(len(hp.fwd_hooks) for hp in {id(h): h for h in model.hook_dict.values()}.values())


def by_hand(fn):
    """A plain TransformerLens hook computing the intervention by hand."""

    def hook(act, hook):
        return fn(act)

    return [(HOOK, hook)]


def manual_topk_latents(sae, x):
    pre = x @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))


@torch.no_grad()
def test_splice_equals_manual_hook(model):
    sae = random_sae()
    toks = tokens()
    expected = model.run_with_hooks(toks, fwd_hooks=by_hand(lambda x: manual_topk_latents(sae, x) @ sae.W_dec + sae.b_dec))
    model.add_sae(sae)
    got = model(toks)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.run_with_hooks(toks, fwd_hooks=[]) * 0 + expected * 0 + 1)  # sanity: non-trivial
    model.reset_saes()
    assert hooks_attached(model) == model._hooks_before_any_sae


@torch.no_grad()
def test_error_term_reproduces_clean_logits(model):
    toks = tokens()
    clean = model(toks)
    model.add_sae(random_sae(), error_term=True)
    spliced = model(toks)
    torch.testing.assert_close(spliced, clean, atol=ATOL, rtol=0)
    model.reset_saes()
    model.add_sae(random_sae())
    assert (model(toks) - clean).abs().max() > 1e-3  # without the error term the output changes


@torch.no_grad()
def test_capture_equals_encode_of_cached_activations(model):
    sae = random_sae()
    toks = tokens()
    _, clean_cache = model.run_with_cache(toks)
    clean_logits = model(toks)
    model.add_sae(sae, splice=False)
    logits, cache = model.run_with_cache(toks)
    torch.testing.assert_close(logits, clean_logits, atol=0, rtol=0)  # capture never changes the forward
    x = clean_cache[HOOK]
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], manual_topk_latents(sae, x), atol=ATOL, rtol=0)
    recon = manual_topk_latents(sae, x) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"], recon, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_error"], x - recon, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["zero", "mean", "clamp"])
@torch.no_grad()
def test_ablation_equals_manual_edit(model, mode):
    sae = random_sae("relu")
    toks = tokens()
    _, cache = model.run_with_cache(toks)
    x = cache[HOOK]
    f = torch.relu(x @ sae.W_enc + sae.b_enc)
    S = f.flatten(0, 1).mean(0).topk(3).indices  # latents that really fire
    means = f.flatten(0, 1).mean(0)
    new_value = {"zero": torch.zeros(3), "mean": means[S], "clamp": torch.full((3,), 2.5)}[mode]

    def edit(x):
        f = torch.relu(x @ sae.W_enc + sae.b_enc)
        recon = f @ sae.W_dec + sae.b_dec
        f2 = f.clone()
        f2[..., S] = new_value
        return f2 @ sae.W_dec + sae.b_dec + (x - recon)

    expected = model.run_with_hooks(toks, fwd_hooks=by_hand(edit))
    att = model.add_sae(sae, error_term=True)
    att.ablate(S, mode, means=means, value=2.5)
    torch.testing.assert_close(model(toks), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_steering_at_positions_equals_manual_edit(model):
    sae = random_sae()
    toks = tokens()
    latent, alpha = 5, 3.0
    direction = sae.W_dec[latent] / sae.W_dec[latent].norm()

    def edit(x):
        x = x.clone()
        x[:, [2, 4]] += alpha * direction
        return x

    expected = model.run_with_hooks(toks, fwd_hooks=by_hand(edit))
    att = model.add_sae(sae, splice=False)
    att.steer(latent, alpha, positions=[2, 4])
    torch.testing.assert_close(model(toks), expected, atol=ATOL, rtol=0)
    att.clear_edits()
    torch.testing.assert_close(model(toks), model.run_with_hooks(toks, fwd_hooks=[]), atol=0, rtol=0)


@torch.no_grad()
def test_skip_bos_position_and_token(model):
    sae = random_sae()
    toks = tokens()
    toks[:, 0] = 0  # a BOS-like token at position 0
    toks[1, 3] = 0  # and once more mid-sequence

    def splice_except(mask):
        def fn(x):
            out = manual_topk_latents(sae, x) @ sae.W_dec + sae.b_dec
            return torch.where(mask[..., None], x, out)

        return fn

    pos_mask = torch.zeros(2, 7, dtype=torch.bool)
    pos_mask[:, 0] = True
    expected = model.run_with_hooks(toks, fwd_hooks=by_hand(splice_except(pos_mask)))
    with model.saes(sae, skip_positions=[0]):
        torch.testing.assert_close(model(toks), expected, atol=ATOL, rtol=0)
    tok_mask = toks == 0
    expected = model.run_with_hooks(toks, fwd_hooks=by_hand(splice_except(tok_mask)))
    with model.saes(sae, skip_tokens=[0]):
        torch.testing.assert_close(model(toks), expected, atol=ATOL, rtol=0)
        _, cache = model.run_with_cache(toks)
        assert (cache[f"{HOOK}.hook_sae_acts_post"][tok_mask] == 0).all()
    assert hooks_attached(model) == model._hooks_before_any_sae


@torch.no_grad()
def test_generation_with_steering_matches_manual_hooks(model):
    sae = random_sae()
    prompt = tokens(1, 4)
    latent, alpha = 7, 8.0
    direction = sae.W_dec[latent] / sae.W_dec[latent].norm()
    kw = dict(max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False)
    with model.hooks(fwd_hooks=by_hand(lambda x: x + alpha * direction)):
        expected = model.generate(prompt, **kw)
    clean = model.generate(prompt, **kw)
    att = model.add_sae(sae, splice=False)
    att.steer(latent, alpha)
    got = model.generate(prompt, **kw)
    assert torch.equal(got, expected)
    assert not torch.equal(got, clean)  # the steering is strong enough to change the text


@torch.no_grad()
def test_generation_position_filter_uses_absolute_positions(model):
    """Steering only the prompt's last position (3) must not leak to generated tokens."""
    sae = random_sae()
    prompt = tokens(1, 4)
    direction = sae.W_dec[1] / sae.W_dec[1].norm()
    kw = dict(max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False)
    # Truth: no KV cache, the full sequence is re-run every step; position 3 is steered each time.
    def edit(x):
        x = x.clone()
        x[:, 3] += 6.0 * direction
        return x

    with model.hooks(fwd_hooks=by_hand(edit)):
        expected = model.generate(prompt, use_past_kv_cache=False, **kw)
    seen = {"n": 0}

    def edit_cached(x):
        # With a KV cache, later steps feed one new token each; some models (boot_native bridges)
        # ignore the cache and re-feed the whole sequence, which starts at position 0 again.
        start = seen["n"] if x.shape[1] == 1 else 0
        seen["n"] = start + x.shape[1]
        if start <= 3 < seen["n"]:
            x = x.clone()
            x[:, 3 - start] += 6.0 * direction
        return x

    with model.hooks(fwd_hooks=by_hand(edit_cached)):
        expected_cached = model.generate(prompt, use_past_kv_cache=True, **kw)
    att = model.add_sae(sae, splice=False)
    att.steer(1, 6.0, positions=[3])
    got_cached = model.generate(prompt, use_past_kv_cache=True, **kw)
    got_uncached = model.generate(prompt, use_past_kv_cache=False, **kw)
    assert torch.equal(got_uncached, expected)
    assert torch.equal(got_cached, expected_cached)
    assert seen["n"] == prompt.shape[1] + kw["max_new_tokens"] - 1


def test_user_hook_on_latents_edits_the_forward(model):
    """SAELens idiom: a hook on ``{hook}.hook_sae_acts_post`` changes the spliced output."""
    sae = random_sae()
    toks = tokens()

    def zero_latents(f, hook):
        return torch.zeros_like(f)

    model.add_sae(sae)
    with torch.no_grad():
        got = model.run_with_hooks(toks, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_latents)])
        expected = model.run_with_hooks(toks, fwd_hooks=[])  # warm path, then manual truth below
    model.reset_saes()
    with torch.no_grad():
        truth = model.run_with_hooks(toks, fwd_hooks=by_hand(lambda x: torch.zeros_like(x) + sae.b_dec))
    torch.testing.assert_close(got, truth, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, truth)


def test_unknown_hook_lists_close_matches(model):
    with pytest.raises(HookNotFoundError, match=r"blocks\.0\.hook_resid_pots.*Did you mean.*'blocks\.0\.hook_resid_post'"):
        model.add_sae(random_sae(), hook="blocks.0.hook_resid_pots")
    assert hooks_attached(model) == model._hooks_before_any_sae


def test_width_mismatch_names_hook_and_shapes(model):
    sae = make_sae("relu", 16, 32)
    with pytest.raises(ShapeMismatchError, match=r"blocks\.1\.hook_resid_pre.*16.*32"):
        model.add_sae(sae, hook="blocks.1.hook_resid_pre")
    assert hooks_attached(model) == model._hooks_before_any_sae


def test_width_mismatch_at_unknown_width_site_raises_in_forward_without_leaking(model):
    sae = make_sae("relu", 16, 32)
    model.add_sae(sae, hook="blocks.0.attn.hook_pattern")  # width unknown before running
    with pytest.raises(ShapeMismatchError):
        model(tokens())
    model.reset_saes()
    assert hooks_attached(model) == model._hooks_before_any_sae


def test_exception_inside_context_manager_leaves_no_hook(model):
    before = hooks_attached(model)
    with pytest.raises(RuntimeError, match="user error"):
        with model.saes(random_sae(), random_sae(seed=1)):
            assert hooks_attached(model) > before
            raise RuntimeError("user error")
    assert hooks_attached(model) == before
    assert not model.sae_manager.attachments


def test_two_saes_on_one_hook_stack_in_order(model):
    """Documented rule: SAEs on one site run in attachment order, each on the previous output."""
    a, b = random_sae(seed=1), random_sae("relu", seed=2)
    toks = tokens()
    with torch.no_grad():
        expected = model.run_with_hooks(toks, fwd_hooks=by_hand(lambda x: b(a(x))))
        only_b = model.run_with_hooks(toks, fwd_hooks=by_hand(b))
        model.add_sae(a)
        att_b = model.add_sae(b)
        torch.testing.assert_close(model(toks), expected, atol=ATOL, rtol=0)
        assert att_b.name == f"{HOOK}.sae1"
        model.add_sae(b, replace=True)  # replace drops both earlier ones
        torch.testing.assert_close(model(toks), only_b, atol=ATOL, rtol=0)
    assert len(model.sae_manager.attachments) == 1
    model.remove_sae(b)
    assert hooks_attached(model) == model._hooks_before_any_sae


def test_existing_methods_keep_working(model):
    toks = tokens()
    with torch.no_grad():
        clean = model(toks)
        model.add_sae(random_sae(), error_term=True)
        model.reset_hooks()  # TL's own reset leaves permanent SAE hooks alone
        torch.testing.assert_close(model(toks), clean, atol=ATOL, rtol=0)
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post"))
        assert HOOK in cache
        model.reset_saes()
        assert torch.equal(model(toks), clean)


@torch.no_grad()
def test_module_path_site_resolves_on_a_bridge_over_hf():
    """An SAE that only knows its HF module path attaches to a bridge over that HF model."""
    from sae_hooks.adapters.transformer_lens import attach

    model = attach(build_tl_model("bridge_hf"))
    sae = make_sae("relu", D, 64, sites=[{"module": "transformer.h.0"}])
    toks = tokens()
    expected = model.run_with_hooks(toks, fwd_hooks=by_hand(sae))
    att = model.add_sae(sae)
    assert att.sites == [HOOK]
    torch.testing.assert_close(model(toks), expected, atol=ATOL, rtol=0)
