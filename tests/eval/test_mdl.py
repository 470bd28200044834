"""MDL description length against closed forms and scipy's entropy."""

from __future__ import annotations

import math

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.eval.mdl import dense_description_length, description_length, find_precision, quantize
from sae_hooks.saes.base import SparseLatents


def test_binary_latent_costs_at_most_one_bit() -> None:
    g = torch.Generator().manual_seed(0)
    for p in (0.05, 0.3, 0.5, 0.9):
        a = (torch.rand(10_000, 1, generator=g) < p).float()
        q = a.double().mean().item()
        dl = description_length(a, precision=0.25)
        h = -(q * math.log2(q) + (1 - q) * math.log2(1 - q))
        assert dl["entropy_bits"] == pytest.approx(h, rel=1e-9) and dl["entropy_bits"] <= 1.0


def test_entropy_of_a_known_distribution_and_zero_is_its_own_outcome() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    n = 6000
    # latent 0: inactive 1/2, else uniform over bins [0,Δ), [Δ,2Δ), [2Δ,3Δ) -> 0.5 + 1.5·log2(6)/... ; latent 1: Poisson-ish
    lat = torch.zeros(n, 2)
    lat[n // 2 :, 0] = torch.tensor([0.1, 0.7, 1.3]).repeat(n // 6)  # bins 0, 1, 2 at Δ = 0.5 (0.1 is active: bin 0 ≠ inactive)
    vals = torch.poisson(torch.full((n,), 2.0), generator=g)
    lat[:, 1] = vals * 0.5 + 0.2 * (vals > 0)  # bins floor(v + 0.4) = v at Δ = 0.5; zeros stay inactive
    dl = description_length(lat, precision=0.5)
    h0 = 0.5 * 1 + 0.5 * (1 + math.log2(3))  # H(inactive 1/2, three bins 1/6 each)
    assert h0 == pytest.approx(stats.entropy([3, 1, 1, 1], base=2))
    _, counts = torch.unique(vals, return_counts=True)
    h1 = stats.entropy(counts.numpy(), base=2)
    assert dl["entropy_bits"] == pytest.approx(h0 + h1, rel=1e-9)
    assert dl["l0"] == pytest.approx(0.5 + (vals > 0).float().mean().item())
    # sparse and dense inputs give the same numbers
    values, idx = lat.topk(2, dim=-1)
    sparse = description_length(SparseLatents(values, idx, 2), precision=0.5)
    assert sparse["entropy_bits"] == pytest.approx(dl["entropy_bits"]) and sparse["l0"] == pytest.approx(dl["l0"])


def _topk_latents(d_sae=512, k=8, n=3000, seed=0):
    torch.manual_seed(seed)
    sae = make_sae("topk", 32, d_sae, k=k)
    x = torch.randn(n, 32)
    return sae, x, sae.encode_with_state(x)[0]


def test_bound_dominates_the_entropy_and_both_fall_with_coarser_precision() -> None:
    sae, x, lat = _topk_latents()
    prev = None
    for j in range(8):
        p = 2.0 / 2**j  # halving grid: coarser bins are unions of finer ones
        dl = description_length(lat, p)
        assert dl["l0"] == pytest.approx(8.0)
        assert dl["entropy_bits"] <= dl["bound_bits"]
        if prev is not None:  # finer precision never costs fewer bits
            assert dl["entropy_bits"] >= prev["entropy_bits"] - 1e-9 and dl["bound_bits"] >= prev["bound_bits"] - 1e-9
        prev = dl
    d = dense_description_length(x, 0.25)
    span = int(torch.floor(x / 0.25).max() - torch.floor(x / 0.25).min()) + 1
    assert d["dense_bits"] == pytest.approx(32 * math.log2(span)) and d["dense_entropy_bits"] <= d["dense_bits"]


def test_quantize_and_find_precision() -> None:
    lat = torch.tensor([[0.0, 0.26, 1.9]])
    torch.testing.assert_close(quantize(lat, 0.5), torch.tensor([[0.0, 0.25, 1.75]]))
    sae, x, _ = _topk_latents(d_sae=128, k=8, n=512)
    r = find_precision(sae, [x], tolerance=0.01)
    assert r["metric"] == "fvu" and r["degradation"] <= 0.01
    coarser = find_precision(sae, [x], tolerance=0.2)
    assert coarser["precision"] >= r["precision"]
    with pytest.raises(ValueError, match="precision"):
        description_length(lat, 0.0)
