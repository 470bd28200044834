"""The error node's gradient in every adapter: a TransformerLens backward hook on ``{site}.hook_sae_error``
fires, and the torch adapter's ``sae_capture(detach=False)`` records an error that gradients reach (the
error term stays out of the graph to the model's activation). Truth: with the SAE spliced with its error term
the site's output is ``recons + error``, so d metric / d error is the gradient at the site in the clean
model (no SAE), taken by the framework's own backward hook / autograd."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tl_model, tiny_hf_gpt2
from sae_hooks import make_sae

SITE = "blocks.0.hook_resid_post"


def _sae() -> torch.nn.Module:
    torch.manual_seed(4)
    sae = make_sae("topk", 32, 48, k=6)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
    return sae


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, :9].logsumexp(-1).sum() - logits[:, 2, 4].sum()


@pytest.mark.parametrize("kind", ["bridge_native", "bridge_hf", "hooked_transformer"])
def test_tl_backward_hook_on_the_error_node(kind: str) -> None:
    from sae_hooks.adapters.transformer_lens import attach

    model = build_tl_model(kind)
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    clean: dict[str, torch.Tensor] = {}
    model.add_hook(SITE, lambda g, hook: clean.__setitem__("g", g.detach().clone()), dir="bwd")
    _metric(model(tokens)).backward()
    model.reset_hooks()
    attach(model)
    model.add_sae(_sae(), SITE, error_term=True)
    got: dict[str, torch.Tensor] = {}
    model.add_hook(f"{SITE}.hook_sae_error", lambda g, hook: got.__setitem__("g", g.detach().clone()), dir="bwd")
    _metric(model(tokens)).backward()
    model.reset_hooks()
    torch.testing.assert_close(got["g"], clean["g"], atol=1e-5, rtol=1e-4)
    assert clean["g"].abs().sum() > 0


def test_torch_capture_with_grad_records_the_error_node() -> None:
    from sae_hooks.adapters.torch import attach

    hf = tiny_hf_gpt2(seed=2)
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    kept = {}

    def keep(mod, args, out):  # noqa: ANN001, ANN202
        x = out[0] if isinstance(out, tuple) else out
        x.retain_grad()
        kept["x"] = x

    clean = copy.deepcopy(hf)
    clean.transformer.h[0].register_forward_hook(keep)
    _metric(clean(tokens).logits).backward()
    model = attach(copy.deepcopy(hf))
    model.add_sae(_sae(), SITE, error_term=True)
    with model.sae_capture(f"{SITE}.hook_sae_error", detach=False) as cache:
        logits = model(tokens).logits
    (g,) = torch.autograd.grad(_metric(logits), cache[f"{SITE}.hook_sae_error"])
    torch.testing.assert_close(g, kept["x"].grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the forward is unchanged
        torch.testing.assert_close(logits.detach(), hf(tokens).logits, atol=1e-5, rtol=1e-5)
