"""Matryoshka SAEs: nested-prefix loss by hand, widths validation, dictionary_learning / SAELens checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae_hooks
from sae_hooks.errors import ConfigError
from sae_hooks.saes import make_sae, training_spec
from sae_hooks.saes.matryoshka import prefix_fvu
from sae_hooks.saes.training import StepContext

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


def _sae(widths=(4, 8), d=8, f=16, k=3):
    torch.manual_seed(0)
    sae = make_sae("matryoshka", d, f, k=k, matryoshka_widths=list(widths))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return sae


def test_widths_are_completed_and_validated():
    assert make_sae("matryoshka", 8, 16, k=2, matryoshka_widths=[4, 8]).widths == [4, 8, 16]
    assert make_sae("matryoshka", 8, 16, k=2).widths == [16]
    for bad in ([8, 4], [0, 16], [4, 20], [4, 4]):
        with pytest.raises(ConfigError, match="matryoshka_widths"):
            make_sae("matryoshka", 8, 16, k=2, matryoshka_widths=bad)
    with pytest.raises(ConfigError, match="matryoshka_widths"):
        make_sae("matryoshka", 8, 16, k=2, matryoshka_widths="4,8")


@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2]])
def test_each_prefix_loss_against_a_hand_computation(weights):
    sae = _sae()
    x = torch.randn(12, 8)
    spec = training_spec("matryoshka")
    settings = spec.settings.from_dict({"aux_coefficient": 0.0, "prefix_weights": weights})
    out = spec.loss(sae, x, None, settings, StepContext(step=0, mse_scale=0.9, dead=torch.zeros(16, dtype=torch.bool)))
    spec.after_step(sae, settings, out, True)
    pre = x @ sae.W_enc + sae.b_enc
    post = torch.relu(pre).detach()
    keep = post >= post.flatten().topk(3 * 12).values.min()
    f = post * keep
    w = weights or [1 / 3] * 3
    total = 0.0
    for w_g, m in zip(w, [4, 8, 16]):
        x_hat = f[:, :m] @ sae.W_dec[:m] + sae.b_dec
        total += w_g * ((x - x_hat) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.loss, 0.9 * total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["mse"], ((x - (f @ sae.W_dec + sae.b_dec)) ** 2).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.threshold, f[f > 0].min())


def test_prefix_fvu_by_hand_and_decode_prefix():
    sae = _sae()
    x = torch.randn(30, 8) * 2
    fvu = prefix_fvu(sae, x)
    f = sae.encode(x)
    var = ((x - x.mean(0)) ** 2).sum()
    for m in (4, 8, 16):
        ref = ((x - (f[:, :m] @ sae.W_dec[:m] + sae.b_dec)) ** 2).sum() / var
        assert fvu[m] == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(sae.decode_prefix(f, 16), sae.decode(f))


def test_dictionary_learning_checkpoint_loads_as_matryoshka_with_its_group_sizes():
    path = GOLDEN / "dictionary_learning" / "matryoshka_batchtopk" / "trainer_0"
    sae = sae_hooks.load(path)
    raw = torch.load(path / "ae.pt", weights_only=True)
    assert sae.cfg.architecture == "matryoshka"
    assert sae.widths == torch.cumsum(raw["group_sizes"], 0).tolist() == [4, 8, 16]
    golden = load_file(str(GOLDEN / "dictionary_learning" / "matryoshka_batchtopk" / "golden.safetensors"))
    torch.testing.assert_close(sae.encode(golden["x"]), golden["latents"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(golden["x"]), golden["recon"], atol=1e-5, rtol=1e-5)
    # a prefix reconstruction from the library's own tensors: decode the first m latents only
    f = golden["latents"]
    for m in sae.widths:
        ref = f[..., :m] @ raw["W_dec"][:m] + raw["b_dec"]
        torch.testing.assert_close(sae.decode_prefix(f, m), ref, atol=1e-5, rtol=1e-5)


SAELENS_TRAINING = GOLDEN / "saelens" / "matryoshka_batchtopk_training"


@pytest.mark.skipif(not SAELENS_TRAINING.exists(), reason="SAELens training-format Matryoshka fixture not generated")
def test_saelens_training_checkpoint_loads_as_matryoshka():
    sae = sae_hooks.load(SAELENS_TRAINING)
    golden = load_file(str(SAELENS_TRAINING / "golden.safetensors"))
    assert sae.cfg.architecture == "matryoshka" and sae.widths == [4, 8, 16]
    torch.testing.assert_close(sae.encode(golden["x"]), golden["latents"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(golden["x"]), golden["recon"], atol=1e-5, rtol=1e-5)
    # the training selection (batch top-k of SAELens's decoder-norm-scaled activations) equals ours on the folded weights
    torch.testing.assert_close(sae.batch_topk(sae.pre_acts(golden["x"])), golden["latents_batch_topk"], atol=1e-5, rtol=1e-5)
    for m in sae.widths:
            torch.testing.assert_close(sae.decode_prefix(golden["latents"], m), golden[f"prefix_recon_{m}"], atol=1e-5, rtol=1e-5)


def test_saelens_inference_export_stays_jumprelu_with_the_same_outputs():
    path = GOLDEN / "saelens" / "matryoshka_batchtopk_saved_inference"
    sae = sae_hooks.load(path)
    golden = load_file(str(path / "golden.safetensors"))
    assert sae.cfg.architecture == "jumprelu"
    torch.testing.assert_close(sae(golden["x"]), golden["recon"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b_dec_in", [False, True])
def test_sparse_prefix_loss_gradients_equal_the_dense_definition_with_autograd(b_dec_in):
    """The sparse loss (ragged prefixes + AuxK) against the dense one by hand, value and every gradient."""
    torch.manual_seed(3)
    n, d, f_width, k, widths = 19, 8, 32, 3, [4, 12, 32]
    sae = make_sae("matryoshka", d, f_width, k=k, matryoshka_widths=widths[:-1], apply_b_dec_to_input=b_dec_in).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(n, d, dtype=torch.float64)
    x[5] = 0.0  # a token keeping few or no latents: empty prefixes
    dead = torch.zeros(f_width, dtype=torch.bool)
    dead[1::4] = True
    spec = training_spec("matryoshka")
    settings = spec.settings.from_dict({"aux_k": 5, "aux_coefficient": 0.3, "prefix_weights": [0.2, 0.3, 0.5]})
    out = spec.loss(sae, x, None, settings, StepContext(step=0, mse_scale=0.8, dead=dead))
    grads = torch.autograd.grad(out.loss, list(sae.parameters()))

    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    x_in = x - params["b_dec"] if b_dec_in else x
    pre = x_in @ params["W_enc"] + params["b_enc"]
    f = sae.batch_topk(pre)  # the dense definition
    total, x_hat = 0.0, params["b_dec"]
    for w_g, a, m in zip([0.2, 0.3, 0.5], [0, *widths], widths):
        x_hat = x_hat + f[:, a:m] @ params["W_dec"][a:m]
        total = total + w_g * (x - x_hat).pow(2).sum(-1).mean()
    resid = (x - x_hat).detach()
    aux_idx = pre.detach().masked_fill(~dead, float("-inf")).topk(5, dim=-1).indices
    fa = torch.zeros_like(pre).scatter(-1, aux_idx, 1.0) * torch.relu(pre)
    denom = (resid - resid.mean(0)).pow(2).sum(-1).mean()
    loss = 0.8 * total + 0.3 * (fa @ params["W_dec"] - resid).pow(2).sum(-1).mean() / denom
    torch.testing.assert_close(out.loss, loss)
    for (name, _), a, e in zip(sae.named_parameters(), grads, torch.autograd.grad(loss, list(params.values()))):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(out.updates["min_kept"], f.detach()[f.detach() > 0].min())
    assert torch.equal(out.fired, (f > 0).any(0))


def test_matryoshka_training_never_builds_a_dense_batch_by_d_sae_tensor(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    from sae_hooks.saes import kernels

    n, d, f_width = 23, 10, 40
    monkeypatch.setattr(kernels, "SELECT_BLOCK_ELEMENTS", 4 * f_width)
    sae = make_sae("matryoshka", d, f_width, k=4, matryoshka_widths=[5, 20]).double()
    x = torch.randn(n, d, dtype=torch.float64)
    biggest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:  # CSR patterns are fine
                    biggest.append(t.numel())
            return out

    spec = training_spec("matryoshka")
    dead = torch.zeros(f_width, dtype=torch.bool)
    dead[::3] = True
    with Watch():
        out = spec.loss(sae, x, None, spec.settings.from_dict({"aux_k": 4}), StepContext(mse_scale=1.0, dead=dead))
        out.loss.backward()
    assert max(biggest) < n * f_width
