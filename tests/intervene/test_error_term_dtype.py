"""The error term is exact whatever the SAE's dtype (issue 10 item 4): with no edits the spliced forward
equals the clean forward to the model's own precision; with an edit the change is the edit's alone.
Truth: the clean fp32 model, and the SAE's equations by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_hooks import make_sae

pytest.importorskip("transformers")
from sae_hooks.adapters.torch import attach  # noqa: E402

SITE = "blocks.0.hook_resid_post"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sae_error_term_is_exact(hf, dtype) -> None:
    torch.manual_seed(2)
    sae = make_sae("relu", 32, 48, sites=[SITE])
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    sae = sae.to(dtype)
    model = attach(copy.deepcopy(hf))
    tokens = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = model(tokens).logits
        with model.saes(sae, error_term=True):
            spliced = model(tokens).logits
    assert spliced.dtype == torch.float32
    torch.testing.assert_close(spliced, clean, atol=1e-6, rtol=1e-6)  # fp32 precision, not bf16's 1e-3
    # an edit still acts: ablating a firing latent changes the output by decode(f') - decode(f)
    got = {}
    h = hf.transformer.h[0].register_forward_hook(lambda m, a, o: got.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hf(tokens)
    h.remove()
    f = sae.encode(got["x"].to(dtype))
    latent = int(f.flatten(0, -2).gt(0).sum(0).argmax())
    att = model.add_sae(sae, error_term=True)
    att.ablate(latent)
    with model.sae_capture(f"{SITE}.hook_sae_output") as cache, torch.no_grad():
        model(tokens)
    expected = got["x"] - (f[..., latent:latent + 1] * sae.W_dec[latent]).float()
    torch.testing.assert_close(cache[f"{SITE}.hook_sae_output"], expected, atol=2e-2, rtol=2e-2)
    assert (cache[f"{SITE}.hook_sae_output"] - got["x"]).abs().max() > 1e-2
