"""The one-pass collector against brute force over all tokens: counts, maxima, histograms, top-k contexts
(with their windows), uniform samples, co-active latents; dense and sparse inputs give the same result."""

from __future__ import annotations

import math

import pytest
import torch

from sae_hooks.eval.dashboard import CollectorSettings, FeatureCollector
from sae_hooks.saes.base import SparseLatents

D, K, B, S = 40, 4, 6, 12


def _batches(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        tokens = torch.randint(1, 500, (B, S), generator=g)
        keep = torch.rand(B, S, generator=g) > 0.15
        pre = torch.randn(int(keep.sum()), D, generator=g) + torch.linspace(-1, 1, D)  # uneven frequencies
        v, i = pre.topk(K, dim=1)
        yield tokens, keep, SparseLatents(v.relu(), i, D)


def test_statistics_and_top_contexts_equal_brute_force():
    s = CollectorSettings(n_top=3, n_samples=5, left=2, right=1, n_coactive=2, bins_per_decade=4)
    sparse, dense = FeatureCollector(D, s), FeatureCollector(D, s)
    full, toks, keeps = [], [], []
    for tokens, keep, lat in _batches():
        sparse.update(tokens, keep, lat)
        dense.update(tokens, keep, lat.to_dense())
        grid = torch.zeros(B, S, D)
        grid[keep] = lat.to_dense()
        full.append(grid), toks.append(tokens), keeps.append(keep)
    st, sd = sparse.finish(), dense.finish()
    A = torch.cat(full)  # (n_seq, S, D), zero where dropped
    T = torch.cat(toks)
    flat = A[torch.cat(keeps)]
    assert st.n_tokens == flat.shape[0]
    assert torch.equal(st.count, (flat > 0).sum(0))
    torch.testing.assert_close(st.max, flat.max(0).values)
    torch.testing.assert_close(st.sum, flat.double().sum(0))
    # Histogram: the same bin for every firing, computed independently with math.log10.
    want = torch.zeros(D, s.n_bins, dtype=torch.int32)
    for j in range(D):
        for v in flat[:, j][flat[:, j] > 0].tolist():
            b = min(max(math.floor((math.log10(v) - math.log10(s.hist_lo)) * s.bins_per_decade) + 1, 0), s.n_bins - 1)
            want[j, b] += 1
    assert torch.equal(st.hist, want)
    for name in ("keys", "value", "tokens", "acts", "coactive"):
        assert torch.equal(st.top[name], sd.top[name]), name  # dense input gives the same
    for j in range(D):
        n = min(s.n_top, int(st.count[j]))
        vals, where = A[..., j].flatten().topk(n)
        torch.testing.assert_close(st.top["keys"][j, :n], vals)
        assert torch.isinf(st.top["keys"][j, n:]).all()  # fewer firings than slots: the rest stay empty
        for r, pos in enumerate(where.tolist()):
            q, p = divmod(pos, S)
            window = [T[q, c].item() if 0 <= c < S else -1 for c in range(p - s.left, p + s.right + 1)]
            acts = [A[q, c, j].item() if 0 <= c < S else 0.0 for c in range(p - s.left, p + s.right + 1)]
            assert st.top["tokens"][j, r].tolist() == window
            torch.testing.assert_close(st.top["acts"][j, r].float(), torch.tensor(acts), rtol=1e-3, atol=1e-3)
            others = A[q, p].clone()
            others[j] = 0
            strongest = [int(i) for i in others.topk(s.n_coactive).indices if others[i] > 0]
            got = [c for c in st.top["coactive"][j, r].tolist() if c >= 0]
            assert got == strongest


def test_samples_are_firings_drawn_uniformly():
    """Each firing of a latent enters the sample with probability n_samples / firings."""
    s = CollectorSettings(n_top=1, n_samples=4, left=0, right=0, n_coactive=1)
    hits = torch.zeros(20)
    runs = 300
    for seed in range(runs):
        c = FeatureCollector(2, CollectorSettings(**{**s.__dict__, "seed": seed}))
        for b in range(4):  # latent 0 fires 5 times per batch with distinct values 1..20
            vals = torch.arange(5 * b + 1, 5 * b + 6, dtype=torch.float32)
            lat = SparseLatents(vals.view(5, 1), torch.zeros(5, 1, dtype=torch.long), 2)
            c.update(torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool), lat)
        sample = c.finish().samples["value"][0]
        assert len(set(sample.tolist())) == 4 and all(1 <= v <= 20 for v in sample.tolist())
        hits[sample.long() - 1] += 1
    freq = hits / runs  # each of the 20 firings: expected 4 / 20 = 0.2
    assert freq.min() > 0.1 and freq.max() < 0.3, freq


def test_wrong_width_is_refused():
    from sae_hooks.errors import ShapeMismatchError

    c = FeatureCollector(8)
    with pytest.raises(ShapeMismatchError, match="d_sae=6"):
        c.update(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), torch.rand(3, 6))
