"""Latent matching against scipy's dense Hungarian solver, a planted permutation, and the fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.eval.matching import assign, match_latents, top_candidates

linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _lsa_value(A, B):
    S = (_unit(A) @ _unit(B).T).double().numpy()
    r, c = linear_sum_assignment(S, maximize=True)
    return S, S[r, c].sum()


@pytest.mark.parametrize("shape", [(40, 40), (30, 50), (50, 30)])
def test_sparse_path_equals_the_dense_hungarian_optimum(shape) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    # trained-like: B is a noisy permutation of A plus extra latents, so candidates hold the optimum
    A = torch.randn(shape[0], 16, generator=g)
    base = torch.cat([A, torch.randn(max(0, shape[1] - shape[0]), 16, generator=g)])[: shape[1]]
    B = base[torch.randperm(shape[1], generator=g)] + 0.3 * torch.randn(shape[1], 16, generator=g)
    S, best = _lsa_value(A, B)
    for candidates in (4, 64):  # few candidates (sparse graph) and all of them
        r, c = assign(A, B, candidates=candidates, dense_limit=0, block_elements=64)
        assert len(r) == min(shape) and len(set(r)) == len(r) and len(set(c)) == len(c)
        assert S[r, c].sum() == pytest.approx(best, rel=1e-6)


def test_random_dictionaries_with_all_candidates_equal_lsa() -> None:
    g = torch.Generator().manual_seed(7)
    A, B = torch.randn(60, 8, generator=g), torch.randn(60, 8, generator=g)
    S, best = _lsa_value(A, B)
    r, c = assign(A, B, candidates=60, dense_limit=0)
    assert S[r, c].sum() == pytest.approx(best, rel=1e-9)


def test_fallback_when_candidates_run_short() -> None:
    """Every latent of A prefers the same few latents of B: the 1-candidate graph has no full
    matching, yet the result is a valid one-to-one matching, better than greedy matching and close to
    the optimum (which here uses edges outside every candidate list); with all candidates, optimal."""
    g = torch.Generator().manual_seed(3)
    hub = torch.randn(1, 12, generator=g)
    A = hub + 0.05 * torch.randn(40, 12, generator=g)
    B = torch.cat([hub + 0.01 * torch.randn(2, 12, generator=g), torch.randn(38, 12, generator=g)])
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    rows, cols, _ = top_candidates(_unit(A), _unit(B), 1)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(40, 40)).tocsr()
    assert (maximum_bipartite_matching(graph) >= 0).sum() < 40  # candidates run short: no full matching
    S, best = _lsa_value(A, B)
    r, c = assign(A, B, candidates=1, dense_limit=0)
    assert sorted(r.tolist()) == list(range(40)) and sorted(c.tolist()) == list(range(40))
    greedy, used_r, used_c = 0.0, set(), set()
    for flat in np.argsort(-S, axis=None):
        i, j = divmod(int(flat), 40)
        if i not in used_r and j not in used_c:
            greedy, _ = greedy + S[i, j], (used_r.add(i), used_c.add(j))
    assert greedy - 1e-9 <= S[r, c].sum() <= best + 1e-9 and S[r, c].sum() > 0.95 * best
    r, c = assign(A, B, candidates=40, dense_limit=0)
    assert S[r, c].sum() == pytest.approx(best, rel=1e-9)


def test_candidates_cover_each_rows_and_columns_best() -> None:
    g = torch.Generator().manual_seed(0)
    A, B = _unit(torch.randn(37, 6, generator=g)), _unit(torch.randn(53, 6, generator=g))
    rows, cols, sims = top_candidates(A, B, 3, block_elements=100)  # many blocks
    S = A @ B.T
    edges = set(zip(rows.tolist(), cols.tolist()))
    assert all((i, j) in edges for i in range(37) for j in S[i].topk(3).indices.tolist())
    assert all((i, j) in edges for j in range(53) for i in S[:, j].topk(3).indices.tolist())
    torch.testing.assert_close(torch.tensor(sims), S[rows, cols].double(), rtol=1e-6, atol=1e-6)


def test_planted_permutation_is_recovered_exactly() -> None:
    torch.manual_seed(0)
    a = make_sae("topk", 64, 3000, k=8)
    b = make_sae("topk", 64, 3000, k=8)
    perm = torch.randperm(3000)
    with torch.no_grad():
        a.W_enc.normal_()
        b.W_dec.copy_(a.W_dec[perm] * 3.0 + 0.02 * torch.randn(3000, 64))  # rescaled, noisy copies
        b.W_enc.copy_(a.W_enc[:, perm] * 0.5)
    m = match_latents(b, a, candidates=4)  # 3000 > dense limit: the sparse path
    assert torch.equal(m.partner, perm)
    assert m.shared_fraction == 1.0 and len(m.orphans_a) == 0 and len(m.orphans_b) == 0
    s = m.summary()
    assert s["shared"] == 3000 and s["mean_decoder_cos"] > 0.99
    # an unrelated SAE shares nothing at the paper's threshold
    c = make_sae("topk", 64, 3000, k=8)
    none = match_latents(a, c, candidates=4)
    assert none.shared_fraction == 0.0 and (none.partner >= 0).all()
    assert match_latents(a, c, shared="decoder", threshold=-1.0).shared_fraction == 1.0


def test_bad_arguments() -> None:
    from sae_hooks.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match="d_in"):
        match_latents(make_sae("relu", 8, 16), make_sae("relu", 9, 16))
    with pytest.raises(ValueError, match="by must be"):
        match_latents(make_sae("relu", 8, 16), make_sae("relu", 8, 16), by="activations")


def test_half_planted_half_random_matches_the_dense_optimum() -> None:
    """Trained-like: half of B are noisy copies of A's rows, half unrelated. With the default 32
    candidates the sparse path (3000 latents > the dense limit) reaches the Hungarian optimum."""
    g = torch.Generator().manual_seed(0)
    F = 3000
    A = torch.randn(F, 64, generator=g)
    perm = torch.randperm(F, generator=g)
    B = 2.0 * _unit(A)[perm] + 0.05 * torch.randn(F, 64, generator=g)
    B[: F // 2] = torch.randn(F // 2, 64, generator=g)
    S, best = _lsa_value(A, B)
    r, c = assign(A, B)
    assert S[r, c].sum() == pytest.approx(best, rel=1e-5)
    partner = torch.full((F,), -1)
    partner[torch.as_tensor(r)] = torch.as_tensor(c)
    assert torch.equal(partner[perm[F // 2 :]], torch.arange(F // 2, F))


@pytest.mark.parametrize("block_elements,merge_entries", [(400 * 7, 2**20), (400 * 7, 60), (400 * 50, 2**20), (10**9, 2**20)])
def test_blockwise_column_lists_equal_a_dense_top_k(block_elements, merge_entries, monkeypatch) -> None:
    """The per-column lists merged block by block (sparsely, once most entries fall below a column's
    current c-th best; a slice of columns at a time) hold exactly each column's top-c rows of the full
    product, with its values."""
    from sae_hooks.eval import matching

    monkeypatch.setattr(matching._ColumnLists, "merge_entries", merge_entries)  # 60: 12 columns a slice
    g = torch.Generator().manual_seed(1)
    A, B = _unit(torch.randn(500, 12, generator=g)), _unit(torch.randn(400, 12, generator=g))
    rows, cols, sims = top_candidates(A, B, 5, block_elements=block_elements)
    S = A @ B.T
    want = {(i, j) for i in range(500) for j in S[i].topk(5).indices.tolist()}
    want |= {(i, j) for j in range(400) for i in S[:, j].topk(5).indices.tolist()}
    assert set(zip(rows.tolist(), cols.tolist())) == want
    assert np.all(np.diff(rows * 400 + cols) > 0)  # sorted, no duplicates
    torch.testing.assert_close(torch.tensor(sims), S[rows, cols].double(), rtol=1e-6, atol=1e-6)
