"""nnsight 0.8's gradient idiom on SAE taps: ``.grad`` of the latents (``hook_sae_acts_post``) and of the
error node (``hook_sae_error``) read inside ``with metric.backward():`` in a trace, as nnsight documents
it for any module output. Truth: autograd on a copy of the model with the SAE applied by hand in a raw
forward hook (the dense latents and the error as tensors of the graph), non-trivial norm weights and SAE
biases, two model families and three architectures."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import hf_family_cases, randomize_norms
from sae_hooks import make_sae

transformers = pytest.importorskip("transformers")
nnsight = pytest.importorskip("nnsight")
from sae_hooks.adapters.nnsight import attach  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
SITE = "blocks.0.hook_resid_post"


def _model(family: str) -> torch.nn.Module:
    cfg, cls, _ = hf_family_cases()[family]
    torch.manual_seed(5)
    model = cls(cfg).eval()
    randomize_norms(model, seed=6)
    return model


def _sae(arch: str) -> torch.nn.Module:
    torch.manual_seed(21)
    sae = make_sae(arch, 32, 48, sites=[SITE], **({"k": 5} if arch == "topk" else {}))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 0.2)
    return sae


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 3] - logits[:, -1, 11]).sum() + 0.1 * logits[:, 2, :9].logsumexp(-1).sum()


def _truth(hf: torch.nn.Module, sae, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """d metric / d latents and d metric / d error with the SAE spliced (error term) by a raw hook."""
    model = copy.deepcopy(hf)
    layer = model.get_submodule("transformer.h.0" if hasattr(model, "transformer") else "model.layers.0")
    kept: dict[str, torch.Tensor] = {}

    def hook(mod, args, out):  # noqa: ANN001, ANN202
        x = out[0] if isinstance(out, tuple) else out
        f = sae.encode(x)  # dense latents, in the graph (a function of x)
        f.retain_grad()
        x_hat = f @ sae.W_dec + sae.b_dec
        err = (x - x_hat).detach().requires_grad_(True)  # the error node: out of the graph to x
        kept["f"], kept["err"], kept["x"] = f, err, x
        new = x_hat + err
        return (new, *out[1:]) if isinstance(out, tuple) else new

    layer.register_forward_hook(hook)
    logits = model(tokens).logits
    _metric(logits).backward()
    return {"latents": kept["f"].grad, "error": kept["err"].grad, "f": kept["f"].detach(), "logits": logits.detach()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_grad_of_latents_and_error_inside_backward_equals_autograd(family: str, arch: str) -> None:
    hf, sae = _model(family), _sae(arch)
    tokens = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(8))
    truth = _truth(hf, sae, tokens)
    assert truth["latents"].abs().sum() > 0 and truth["error"].abs().sum() > 0
    model = attach(nnsight.NNsight(copy.deepcopy(hf)))
    model.add_sae(sae, error_term=True)
    with model.trace(tokens):
        taps = model.sae_taps[SITE]
        latents = taps.hook_sae_acts_post.output
        error = taps.hook_sae_error.output
        f = latents.detach().clone().save()
        logits = model.output.logits
        kept = logits.detach().clone().save()
        metric = _metric(logits)
        with metric.backward():
            # Gradients arrive in reverse forward order: the error node's before the latents'.
            g_error = error.grad.save()
            g_latents = latents.grad.save()
    torch.testing.assert_close(f, truth["f"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept, truth["logits"], atol=1e-5, rtol=1e-5)  # the forward is the model's
    torch.testing.assert_close(g_latents, truth["latents"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_error, truth["error"], atol=1e-5, rtol=1e-4)
    # The same gradients make attribute()'s attribution-patching scores.
    from sae_hooks.intervene import attribute

    scores = attribute(model, lambda out: _metric(out.logits), tokens)[SITE]
    torch.testing.assert_close(scores.latents, f * g_latents, atol=1e-5, rtol=1e-4)


def test_grad_edit_and_latent_edit_in_one_trace() -> None:
    """A latent edit and a gradient read in the same trace: the gradient is the edited forward's."""
    hf, sae = _model("gpt2"), _sae("relu")
    tokens = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(9))
    model = attach(nnsight.NNsight(copy.deepcopy(hf)))
    model.add_sae(sae, error_term=True)
    with model.trace(tokens):
        taps = model.sae_taps[SITE]
        taps.hook_sae_acts_post.output[:, :, :10] = 0
        latents = taps.hook_sae_acts_post.output
        metric = _metric(model.output.logits)
        with metric.backward():
            g = latents.grad.save()
    # Truth: the same edit as an attachment ablation, gradients by autograd through a capture.
    model.reset_saes()
    att = model.add_sae(sae, error_term=True)
    att.ablate(list(range(10)))
    with model.sae_capture(f"{SITE}.hook_sae_acts_post", detach=False) as cache:
        logits = model._module(tokens).logits
    (truth,) = torch.autograd.grad(_metric(logits), cache[f"{SITE}.hook_sae_acts_post"])
    torch.testing.assert_close(g, truth, atol=1e-5, rtol=1e-4)


def test_no_grad_trace_serves_detached_values_and_changes_nothing() -> None:
    hf, sae = _model("gpt2"), _sae("topk")
    tokens = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(10))
    model = attach(nnsight.NNsight(copy.deepcopy(hf)))
    model.add_sae(sae, error_term=True)
    with torch.no_grad(), model.trace(tokens):
        err = model.sae_taps[SITE].hook_sae_error.output.save()
        logits = model.output.logits.save()
    assert not err.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(logits, hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_every_tap_serves_its_gradient() -> None:
    """Output, error, reconstruction, latents and input taps, in reverse forward order. With the error term
    the site's output is ``recons + error``, so those three gradients are one; the input's comes through the
    encoder (truth: autograd with the SAE's input as a leaf in a raw hook)."""
    hf, sae = _model("gpt2"), _sae("relu")
    tokens = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(11))
    model = attach(nnsight.NNsight(copy.deepcopy(hf)))
    model.add_sae(sae, error_term=True)
    with model.trace(tokens):
        taps = model.sae_taps[SITE]
        x_in, latents = taps.hook_sae_input.output, taps.hook_sae_acts_post.output
        recons, error, out = taps.hook_sae_recons.output, taps.hook_sae_error.output, taps.hook_sae_output.output
        metric = _metric(model.output.logits)
        with metric.backward():
            g_out, g_err, g_rec = out.grad.save(), error.grad.save(), recons.grad.save()
            g_lat, g_in = latents.grad.save(), x_in.grad.save()
    truth = _truth(hf, sae, tokens)
    for g in (g_out, g_err, g_rec):
        torch.testing.assert_close(g, truth["error"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_lat, truth["latents"], atol=1e-5, rtol=1e-4)
    by_hand = copy.deepcopy(hf)
    kept = {}

    def hook(mod, args, o):  # noqa: ANN001, ANN202
        x = o[0] if isinstance(o, tuple) else o
        h = x.detach().requires_grad_(True)  # the SAE's input as a leaf
        kept["x"] = h
        x_hat = sae.encode(h) @ sae.W_dec + sae.b_dec
        new = x_hat + (x - x_hat).detach()
        return (new, *o[1:]) if isinstance(o, tuple) else new

    by_hand.transformer.h[0].register_forward_hook(hook)
    _metric(by_hand(tokens).logits).backward()
    torch.testing.assert_close(g_in, kept["x"].grad, atol=1e-5, rtol=1e-4)

