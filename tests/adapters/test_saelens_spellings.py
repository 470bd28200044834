"""SAELens's spellings on every adapter (issue 10 item (ii)): ``run_with_saes``, ``run_with_cache_with_saes``,
``model.saes(saes=[...])``, ``use_error_term=``; the torch adapter's ``run_with_cache`` and a capture that
keeps every generation step. Truth: raw forward hooks on an unwrapped copy applying the SAE by hand."""

from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import attach_copy  # noqa: E402

SITE = "blocks.0.hook_resid_post"
KEY = f"{SITE}.hook_sae_acts_post"


def _wrap(kind, hf):
    return attach_copy(kind, hf)


def _truth(hf, tokens, sae=None):
    """``(logits, block-0 output)`` of the unwrapped model, with ``sae`` spliced by a raw hook if given."""
    seen = {}

    def hook(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        seen["x"] = h
        if sae is None:
            return None
        new = torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc) @ sae.W_dec + sae.b_dec if sae.cfg.apply_b_dec_to_input \
            else torch.relu(h @ sae.W_enc + sae.b_enc) @ sae.W_dec + sae.b_dec
        return (new, *o[1:]) if isinstance(o, tuple) else new

    handle = hf.transformer.h[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf(tokens).logits, seen["x"]
    finally:
        handle.remove()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("kind", ["torch", "nnsight", "transformer_lens"])
def test_run_with_saes_and_run_with_cache_with_saes(kind, hf, sae) -> None:
    model = _wrap(kind, hf)
    tokens = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    spliced, x = _truth(hf, tokens, sae)
    clean, _ = _truth(hf, tokens)
    assert not torch.allclose(spliced, clean, atol=1e-3)  # the SAE changes the output
    with torch.no_grad():
        torch.testing.assert_close(_logits(model.run_with_saes(tokens, saes=[sae])), spliced, atol=1e-5, rtol=1e-5)
        assert not model.sae_manager.attachments
        torch.testing.assert_close(_logits(model.run_with_saes(tokens, saes=sae, use_error_term=True)), clean,
                                   atol=1e-5, rtol=1e-5)
        out, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    torch.testing.assert_close(_logits(out), spliced, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[KEY], torch.relu(x @ sae.W_enc + sae.b_enc), atol=1e-5, rtol=1e-5)
    assert not model.sae_manager.attachments
    with torch.no_grad():  # reset_saes_end=False leaves the SAE attached, as in SAELens
        model.run_with_saes(tokens, saes=[sae], reset_saes_end=False)
    assert len(model.sae_manager.attachments) == 1
    model.reset_saes()


def test_torch_run_with_cache_and_capture_over_generation_steps(hf, sae) -> None:
    model = _wrap("torch", hf)
    prompt = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    model.add_sae(sae, error_term=True)
    with torch.no_grad():
        out, cache = model.run_with_cache(prompt)
    _, x = _truth(hf, prompt)
    torch.testing.assert_close(cache[KEY], torch.relu(x @ sae.W_enc + sae.b_enc), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.sae_capture(KEY) as cache:
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    fed = ids[:, :-1]  # the last generated token is never fed back
    _, x_all = _truth(hf, fed)
    assert cache[KEY].shape[:2] == fed.shape  # every KV-cached step kept, not only the last
    torch.testing.assert_close(cache[KEY], torch.relu(x_all @ sae.W_enc + sae.b_enc), atol=1e-4, rtol=1e-4)
