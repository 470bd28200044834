"""The nnsight adapter: plain calls, traces, generation, the in-trace latent idiom, padding, errors, leaks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.errors import HookNotFoundError

transformers = pytest.importorskip("transformers")
nnsight = pytest.importorskip("nnsight")
from sae_hooks.adapters.nnsight import attach, detach  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture
def model(hf):
    return attach(nnsight.NNsight(copy.deepcopy(hf)))


def _spliced_truth(hf, sae, tokens, **kw):
    """Logits with layer 0's output replaced by the SAE reconstruction, by a raw hook."""
    m = copy.deepcopy(hf)
    m.transformer.h[0].register_forward_hook(lambda mod, a, o: sae(o))
    with torch.no_grad():
        return m(tokens, **kw).logits


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_plain_call_underlying_call_and_trace_all_apply(model, hf, sae):
    tokens = torch.randint(1, 100, (2, 7))
    expected = _spliced_truth(hf, sae, tokens)
    with model.saes(sae):
        with torch.no_grad():
            a = model(tokens).logits
            b = model._module(tokens).logits
            with model.trace(tokens):
                c = model.output.logits.save()
    for out in (a, b, c):
        assert torch.allclose(out, expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(tokens).logits, expected, atol=1e-3)  # removed again


def test_generate_direct_call_applies(model, hf, sae):
    prompt = torch.tensor([[4, 9, 16]])
    truth = copy.deepcopy(hf)
    truth.transformer.h[0].register_forward_hook(lambda mod, a, o: sae(o))
    with torch.no_grad():
        expected = truth.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        plain = hf.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with model.saes(sae):
        ids = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ids, expected)
    assert not torch.equal(expected, plain)


def test_trace_latent_edit_equals_attachment_ablation(model, sae):
    tokens = torch.randint(1, 100, (2, 6))
    with model.saes(sae, error_term=True) as (att,):
        with model.trace(tokens):
            taps = model.sae_taps["transformer.h.0"]  # the module spelling finds the TL-named taps
            before = model.transformer.h[0].output.clone().save()
            lat = taps.hook_sae_acts_post.output.clone().save()
            taps.hook_sae_acts_post.output[:, :, [2, 5]] = 0
            edited = model.output.logits.save()
        with torch.no_grad():
            att.ablate([2, 5])
            ablated = model(tokens).logits
    assert torch.allclose(lat, sae.encode(before), atol=1e-6)
    assert torch.allclose(edited, ablated, atol=1e-5)
    with torch.no_grad():
        clean = model(tokens).logits
    assert (edited - clean).abs().max() > 1e-3


def test_trace_swap_of_sae_output(model, sae):
    tokens = torch.randint(1, 100, (1, 5))
    with model.saes(sae):
        with model.trace(tokens):
            x = model.transformer.h[0].output.clone().save()
            model.sae_taps["blocks.0.hook_resid_post"].hook_sae_output.output = x * 2
            y = model.transformer.h[1].input.save()
    assert torch.allclose(y, x * 2, atol=1e-6)


def test_left_padding_position_zero_is_first_real_token(model, sae):
    tokens = torch.randint(1, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    with model.saes(sae, skip_positions=0):
        with model.trace(tokens, attention_mask=mask):
            lat = model.sae_taps["blocks.0.hook_resid_post"].hook_sae_acts_post.output.save()
    assert lat[0, 2].abs().sum() == 0 and lat[1, 0].abs().sum() == 0  # first real tokens skipped
    assert lat[0, 3].abs().sum() > 0 and lat[1, 1].abs().sum() > 0


def test_wrong_path_error_and_no_leak_after_exception_in_trace(model, sae):
    module = model._module
    before = _hook_count(module)
    with pytest.raises(HookNotFoundError, match="transformer.h.0"):
        model.add_sae(sae, "transformer.h.O")
    with pytest.raises(RuntimeError, match="boom"):
        with model.saes(sae, error_term=True):
            assert _hook_count(module) == before + 1
            with model.trace(torch.randint(1, 100, (1, 4))):
                model.sae_taps["blocks.0.hook_resid_post"].hook_sae_acts_post.output.save()
                raise RuntimeError("boom")
    assert _hook_count(module) == before
    assert not model.sae_manager.attachments and not model.sae_taps
    detach(model)
    assert "add_sae" not in model.__dict__ and _hook_count(module) == before - 1  # context hook gone too


def test_language_model_on_embedded_model_steers_generation():
    """``LanguageModel`` (text in, tokenizer inside) on the shipped model: a steered ``generate`` equals
    the same generation with a plain forward hook adding the direction by hand."""
    transformers = pytest.importorskip("transformers")
    from nnsight import LanguageModel

    from sae_hooks.adapters.nnsight import attach
    from sae_hooks.app.default_model import default_model_path

    path = str(default_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = attach(LanguageModel(path, tokenizer=tok, dispatch=True))
    sae = make_sae("topk", 128, 256, k=8, sites=["blocks.1.hook_resid_post"])
    direction = sae.W_dec[3] / sae.W_dec[3].norm()
    prompt = "Return the cosine of"
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids = tok(prompt, return_tensors="pt")
    hf_model = lm._module

    def add_direction(module, args, output):
        return (output[0] + 12.0 * direction,) + tuple(output[1:]) if isinstance(output, tuple) else output + 12.0 * direction

    handle = hf_model.transformer.h[1].register_forward_hook(add_direction)
    try:
        with torch.no_grad():
            expected = hf_model.generate(**ids, **kw)
    finally:
        handle.remove()
    with torch.no_grad():
        clean = hf_model.generate(**ids, **kw)
    att = lm.add_sae(sae, splice=False)
    att.steer(3, 12.0)
    with torch.no_grad():
        got = lm.generate(ids["input_ids"], attention_mask=ids["attention_mask"], **kw)
    got = got if isinstance(got, torch.Tensor) else got.sequences
    assert torch.equal(got, expected)
    assert not torch.equal(got, clean)
    lm.reset_saes()
