"""Inference-time encoders against independent truths: scikit-learn's Lasso optimum (ISTA, FISTA,
ITO), exact recovery of a k-sparse code (OMP), and the SAE object they produce works in the attach
layer (capture, splice with error term, ablation) like the SAE it wraps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.encoders import fista, ista, ito, lipschitz_constant, matching_pursuit, orthogonal_matching_pursuit, with_encoder
from sae_hooks.errors import ConfigError


def _dictionary(F=24, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(F, d, generator=g, dtype=torch.float64)
    return W / W.norm(dim=-1, keepdim=True) * (0.5 + torch.rand(F, 1, generator=g, dtype=torch.float64))


def _lasso(W, x, lam):
    lm = pytest.importorskip("sklearn.linear_model")
    out = []
    for row in x.numpy():
        m = lm.Lasso(alpha=lam / W.shape[1], fit_intercept=False, positive=True, tol=1e-12, max_iter=200_000)
        m.fit(W.numpy().T, row)
        out.append(m.coef_)
    return torch.tensor(np.array(out))


def _objective(W, x, s, lam):
    return (0.5 * (x - s @ W).pow(2).sum(-1) + lam * s.abs().sum(-1)).sum().item()


@pytest.mark.parametrize("solver", ["ista", "fista", "ito"])
def test_penalised_solvers_reach_the_lasso_optimum(solver) -> None:
    W = _dictionary()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64)
    lam = 0.3
    ref = _lasso(W, x, lam)
    if solver == "ito":
        s = ito(x, W, lam, max_iter=20_000, lr=1e-3, tol=0)
    else:
        s = {"ista": ista, "fista": fista}[solver](x, W, lam, max_iter=20_000, tol=1e-13)
    assert (s >= 0).all()
    assert _objective(W, x, s, lam) == pytest.approx(_objective(W, x, ref, lam), rel=1e-6 if solver != "ito" else 1e-4)
    torch.testing.assert_close(s, ref, atol=1e-4 if solver != "ito" else 3e-3, rtol=0)
    if solver != "ito":  # proximal steps give exact zeros: the same support (Adam hovers within ~lr of 0)
        assert torch.equal(s > 1e-6, ref > 1e-6)


def test_fista_converges_faster_than_ista() -> None:
    W = _dictionary(F=40, d=12, seed=3)
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = _objective(W, x, _lasso(W, x, 0.2), 0.2)
    gap = {name: _objective(W, x, f(x, W, 0.2, max_iter=100, tol=0), 0.2) - ref for name, f in (("ista", ista), ("fista", fista))}
    assert 0 <= gap["fista"] < 0.2 * gap["ista"]


def test_lipschitz_is_the_largest_squared_singular_value() -> None:
    W = _dictionary()
    assert lipschitz_constant(W) == pytest.approx(torch.linalg.matrix_norm(W, ord=2).item() ** 2, rel=1e-10)


def test_omp_recovers_an_exactly_k_sparse_code() -> None:
    """Identity ∪ Hadamard/√64 (rotated by one random orthogonal matrix) has coherence 1/8 < 1/(2k−1):
    OMP provably recovers every k = 4 sparse code (Tropp 2004) -- exactly, up to rounding."""
    from scipy.linalg import hadamard

    g = torch.Generator().manual_seed(0)
    d, k, n = 64, 4, 50
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    W = torch.cat([torch.eye(d, dtype=torch.float64), torch.tensor(hadamard(d), dtype=torch.float64) / d**0.5]) @ Q
    W = W[torch.randperm(2 * d, generator=g)]
    F = W.shape[0]
    s = torch.zeros(n, F, dtype=torch.float64)
    for i in range(n):
        s[i, torch.randperm(F, generator=g)[:k]] = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    got = orthogonal_matching_pursuit(s @ W, W, k)
    torch.testing.assert_close(got, s, atol=1e-8, rtol=0)
    assert ((got != 0).sum(-1) == k).all()
    # matching pursuit with the same budget is only approximate, but never worse than nothing
    mp = matching_pursuit(s @ W, W, k)
    assert ((s @ W - mp @ W).norm(dim=-1) < (s @ W).norm(dim=-1)).all()


def _sae(arch="topk"):
    torch.manual_seed(0)
    sae = make_sae(arch, 16, 40, k=4, sites=["transformer.h.0"]) if arch == "topk" else make_sae(arch, 16, 40, sites=["transformer.h.0"])
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        if hasattr(sae, "b_enc"):
            sae.b_enc.normal_(0, 0.1)
    return sae


def test_with_encoder_keeps_decoder_and_replaces_encode() -> None:
    sae = _sae()
    x = torch.randn(3, 5, 16)
    new = with_encoder(sae, "omp", k=6)
    assert new.W_dec is sae.W_dec and new.cfg is sae.cfg and isinstance(new, type(sae))
    lat = new.encode(x)
    assert lat.shape == (3, 5, 40) and ((lat != 0).sum(-1) <= 6).all()
    ref = orthogonal_matching_pursuit((x - sae.b_dec).reshape(-1, 16), sae.W_dec, 6).reshape(3, 5, 40)
    torch.testing.assert_close(lat, ref)
    new.chunk_elements = 2 * 40  # two tokens per solver call: same codes
    torch.testing.assert_close(new.encode(x), lat)
    torch.testing.assert_close(new(x), lat @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(new.amortised_encode(x), sae.encode(x))
    # the better encoder reconstructs at least as well as the SAE's own at this budget
    assert (new(x) - x).pow(2).sum() < (sae(x) - x).pow(2).sum()
    # warm-started ITO from the SAE's codes does not increase the objective
    ito_sae = with_encoder(sae, "ito", l1_coefficient=0.05, max_iter=200, lr=1e-2)
    xs = (x - sae.b_dec).reshape(-1, 16)
    obj = lambda s: (0.5 * (xs - s @ sae.W_dec).pow(2).sum(-1) + 0.05 * s.abs().sum(-1)).sum().item()  # noqa: E731
    with torch.no_grad():
        assert obj(ito_sae.encode(x).reshape(-1, 40)) < obj(sae.encode(x).reshape(-1, 40))


def test_with_encoder_rejects_bad_options() -> None:
    sae = _sae("relu")
    with pytest.raises(ConfigError, match="no option"):
        with_encoder(sae, "fista", k=3)
    with pytest.raises(ConfigError, match="unknown encoder"):
        with_encoder(sae, "lars")
    with pytest.raises(ConfigError, match="init"):
        with_encoder(sae, "ito", init="random").encode(torch.randn(2, 16))
    tc = make_sae("relu", 16, 40, d_out=8)
    with pytest.raises(ConfigError, match="transcoder"):
        with_encoder(tc, "omp")


def test_encoded_sae_works_in_the_attach_layer(hf) -> None:
    """Capture, splice with the error term and ablation through the torch adapter use the new codes."""
    import copy

    from sae_hooks.adapters.torch import attach

    torch.manual_seed(0)
    sae = make_sae("topk", 32, 64, k=4)
    enc = with_encoder(sae, "fista", l1_coefficient=0.05, max_iter=300)
    model = attach(copy.deepcopy(hf))
    ids = torch.randint(1, 100, (2, 7))
    key = "blocks.0.hook_resid_post.hook_sae_acts_post"
    with torch.no_grad():
        clean = model(ids).logits
        h = {}
        handle = model.transformer.h[0].register_forward_hook(lambda m, a, o: h.__setitem__("x", o[0] if isinstance(o, tuple) else o))
        model(ids)
        handle.remove()
        att = model.add_sae(enc, site="transformer.h.0", use_error_term=True)
        try:
            with model.sae_capture() as cache:
                logits = model(ids).logits
            lat = cache[key]
            torch.testing.assert_close(lat, enc.encode(h["x"]), rtol=1e-4, atol=1e-5)
            assert not torch.allclose(lat, sae.encode(h["x"]))
            torch.testing.assert_close(logits, clean, rtol=1e-4, atol=1e-4)  # error term: clean forward
            # ablating the most used latent changes the output by exactly its decoded contribution
            j = int((lat != 0).sum((0, 1)).argmax())
            att.ablate([j])
            with model.sae_capture() as cache2:
                ablated = model(ids).logits
            assert (cache2[key][..., j] == 0).all() and not torch.allclose(ablated, clean)
        finally:
            model.reset_saes()
