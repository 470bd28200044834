"""An in-place edit of a recorded SAE tensor in a TransformerLens hook takes effect, as edits of any
TransformerLens activation do (issue 10 item 3). Truth: the SAE applied by hand in a plain hook."""

from __future__ import annotations

import pytest
import torch

from sae_hooks import make_sae
from conftest import build_tl_model

SITE = "blocks.0.hook_resid_post"
LATENTS = [3, 5, 11]


def _sae():
    torch.manual_seed(7)
    s = make_sae("relu", 32, 48, sites=[SITE])
    with torch.no_grad():
        s.b_enc.normal_(0, 0.5)
        s.b_dec.normal_(0, 0.2)
    return s


def _by_hand(sae, x, zero: list[int]):
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc) if sae.cfg.apply_b_dec_to_input else torch.relu(x @ sae.W_enc + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    f_edit = f.clone()
    f_edit[..., zero] = 0
    return f_edit @ sae.W_dec + sae.b_dec + (x - x_hat)  # spliced with the error term


@pytest.mark.parametrize("kind", ["bridge_native", "hooked_transformer"])
def test_in_place_edit_of_latents_in_a_tl_hook_takes_effect(kind) -> None:
    from sae_hooks.adapters.transformer_lens import attach

    model = build_tl_model(kind)
    sae = _sae()
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        truth = model.run_with_hooks(tokens, fwd_hooks=[(SITE, lambda x, hook: _by_hand(sae, x, LATENTS))])
        clean = model(tokens)
    assert not torch.allclose(truth, clean, atol=1e-3)
    model = attach(model)
    model.add_sae(sae, error_term=True)

    def zero_in_place(acts, hook):
        acts[..., LATENTS] = 0  # and return nothing

    def zero_returned(acts, hook):
        acts = acts.clone()
        acts[..., LATENTS] = 0
        return acts

    with torch.no_grad():
        for fn in (zero_in_place, zero_returned):
            got = model.run_with_hooks(tokens, fwd_hooks=[(f"{SITE}.hook_sae_acts_post", fn)])
            torch.testing.assert_close(got, truth, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(tokens), clean, atol=1e-5, rtol=1e-5)  # the hooks are gone again
    model.reset_saes()
