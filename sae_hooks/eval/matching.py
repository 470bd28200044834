"""Cross-seed latent matching (Paulo & Belrose, arXiv 2501.16615) that scales to 131,072 latents.

Two SAEs' latents are matched one-to-one to maximise the summed cosine similarity of their decoder
rows (``by="decoder"``; or encoder columns, or both averaged), as a Hungarian assignment would; a
latent is **shared** when its partner's decoder *and* encoder cosines both exceed ``threshold`` (0.7,
the criterion we read in the paper; ``shared="decoder"`` uses the decoder cosine only).

A dense ``F × F`` cost matrix does not fit at 131k latents (68 GB in float32), so:

1. **Blockwise candidates**: row blocks of ``A`` times ``Bᵀ`` (at most ``block_elements`` floats at a
   time); each latent of ``A`` keeps its ``candidates`` most similar latents of ``B``, and each latent of
   ``B`` its most similar latents of ``A`` (a running top-k over the blocks).
2. **Sparse assignment** on the union of those edges:
   ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp, ``maximize=True``).
3. **Fallback that stays correct** when candidates run short (no full matching on the candidate graph,
   e.g. many latents competing for the same partners): the graph also holds the pairs ``(i, i)`` for
   every ``i < min(F_a, F_b)`` with their true similarity, so a full matching always exists and every
   edge counts at its real value; the latents matched through such non-candidate pairs are matched among themselves by the same
   procedure with twice the candidates (down to a dense ``linear_sum_assignment`` on small
   remainders), their candidate edges join the graph, and the assignment is solved once more on that
   union (which has a full matching of real edges).
   The result is always a valid one-to-one matching, optimal on the final candidate graph; it equals
   the dense Hungarian optimum whenever the optimum uses only those edges (always when
   ``candidates ≥ F``).

Memory is ``O(block_elements + F · candidates)``; time is dominated by the ``F_a · F_b · d`` products.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ShapeMismatchError
from ..saes.base import SAE

DENSE_LIMIT = 2048  # remainders up to this size go to a dense linear_sum_assignment


def _unit(w: Tensor) -> Tensor:
    w = w.detach().float()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _ColumnLists:
    """Running per-column top-``c`` lists ``val/idx (c, Fb)`` (best first) of a product computed in row
    blocks. After the first blocks, only the few entries above a column's current ``c``-th best can
    enter its list: they are filtered with that (possibly stale, hence still safe) threshold, buffered,
    and merged (sorted by column, a slice of columns at a time) once the buffer holds ``c · Fb / 2`` of them, instead of a top-k down
    every column of every block."""

    merge_entries = 2**18  # old list entries merged at a time (memory bound of a merge)

    def __init__(self, c: int, Fb: int, device: torch.device):
        self.c, self.Fb = c, Fb
        self.val = torch.full((c, Fb), float("-inf"), device=device)
        self.idx = torch.zeros(c, Fb, dtype=torch.long, device=device)
        self.buf: list[tuple[Tensor, Tensor, Tensor]] = []
        self.buffered = 0

    def add(self, sim: Tensor, offset: int) -> None:
        """Fold the block ``sim (b, Fb)`` (rows ``offset …``) in."""
        mask = sim > self.val[-1]
        if int(mask.sum()) > sim.numel() // 8:  # early blocks: most entries qualify, a dense top-k is cheaper
            self.flush()
            v, i = sim.topk(min(self.c, sim.shape[0]), dim=0)
            v, pick = torch.cat([self.val, v]).topk(self.c, dim=0)
            self.idx = torch.cat([self.idx, i + offset]).gather(0, pick)
            self.val = v
            return
        rr, cc = mask.nonzero(as_tuple=True)
        if len(rr):
            self.buf.append((cc, sim[rr, cc], rr + offset))
            self.buffered += len(rr)
            if self.buffered >= self.c * self.Fb // 2:
                self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        cc, vv, rr = (torch.cat(t) for t in zip(*self.buf))
        self.buf, self.buffered = [], 0
        order = torch.sort(cc, stable=True).indices
        cc, vv, rr = cc[order], vv[order], rr[order]
        step = max(1, self.merge_entries // self.c)  # columns merged at a time: bounded memory
        bounds = torch.searchsorted(cc, torch.arange(0, self.Fb + step, step, device=cc.device, dtype=cc.dtype)).tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                self._merge(cc[a:b], vv[a:b], rr[a:b])

    def _merge(self, cc: Tensor, vv: Tensor, rr: Tensor) -> None:
        """Merge new entries (columns ``cc`` sorted) into the lists of the columns they touch."""
        c = self.c
        touched = torch.unique_consecutive(cc)
        cols = torch.cat([touched.repeat_interleave(c), cc])
        vals = torch.cat([self.val[:, touched].T.reshape(-1), vv])
        rows = torch.cat([self.idx[:, touched].T.reshape(-1), rr])
        order = torch.sort(vals, descending=True, stable=True).indices
        order = order[torch.sort(cols[order], stable=True).indices]  # by column, best first within one
        group = torch.searchsorted(touched, cols[order])
        counts = torch.bincount(group, minlength=len(touched))
        rank = torch.arange(len(order), device=vals.device) - (torch.cumsum(counts, 0) - counts)[group]
        keep = order[rank < c]  # every touched column holds c old entries + ≥ 1 new: exactly c kept each
        self.val[:, touched] = vals[keep].view(len(touched), c).T
        self.idx[:, touched] = rows[keep].view(len(touched), c).T


@torch.no_grad()
def top_candidates(A: Tensor, B: Tensor, candidates: int, *, block_elements: int = 2**24,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges ``(rows, cols, sims)`` (numpy, deduplicated, sorted by ``rows · Fb + cols``): for unit rows
    ``A (Fa, d)``, ``B (Fb, d)``, each row's ``candidates`` best columns and each column's
    ``candidates`` best rows by ``A @ Bᵀ``, computed ``block_elements`` similarities at a time. The
    similarities are those of the search's own products (no second pass)."""
    Fa, Fb = A.shape[0], B.shape[0]
    c_row, c_col = min(candidates, Fb), min(candidates, Fa)
    block = max(1, block_elements // max(Fb, 1))
    row_val = torch.empty(Fa, c_row, device=A.device)
    row_idx = torch.empty(Fa, c_row, dtype=torch.long, device=A.device)
    columns = _ColumnLists(c_col, Fb, A.device)
    starts = range(0, Fa, block)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="candidate search", unit="block")
    for s in starts:
        sim = A[s : s + block] @ B.T  # (b, Fb)
        v, i = sim.topk(c_row, dim=1)
        row_val[s : s + sim.shape[0]], row_idx[s : s + sim.shape[0]] = v, i
        columns.add(sim, s)
    columns.flush()
    col_val, col_idx = columns.val, columns.idx
    rows = torch.cat([torch.arange(Fa, device=A.device).repeat_interleave(c_row), col_idx.reshape(-1)])
    cols = torch.cat([row_idx.reshape(-1), torch.arange(Fb, device=A.device).repeat(c_col)])
    sims = torch.cat([row_val.reshape(-1), col_val.reshape(-1)])
    keys, order = torch.sort(rows * Fb + cols, stable=True)
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]  # a pair found from both sides: same product, same value
    keys, sims = keys[first], sims[order[first]]
    rows, cols = keys // Fb, keys % Fb
    return rows.cpu().numpy(), cols.cpu().numpy(), sims.double().cpu().numpy()


def edge_sims(A: Tensor, B: Tensor, rows: Any, cols: Any, chunk: int = 2**14) -> np.ndarray:
    """``(A[rows] * B[cols]).sum(-1)`` as float64 numpy, ``chunk`` edges at a time (bounded memory)."""
    rows, cols = torch.as_tensor(rows, device=A.device), torch.as_tensor(cols, device=A.device)
    out = [(A[rows[i : i + chunk]] * B[cols[i : i + chunk]]).sum(-1) for i in range(0, len(rows), chunk)]
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


def _dense_assignment(A: Tensor, B: Tensor) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment((A @ B.T).double().cpu().numpy(), maximize=True)
    return r, c


def _in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``np.isin(keys, sorted_keys)`` for a sorted, duplicate-free ``sorted_keys`` (binary search)."""
    pos = np.searchsorted(sorted_keys, keys)
    return (pos < len(sorted_keys)) & (sorted_keys[np.minimum(pos, len(sorted_keys) - 1)] == keys)


def _solve(rows: np.ndarray, cols: np.ndarray, w: np.ndarray, Fa: int, Fb: int) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight full matching on the bipartite graph of edges ``(rows, cols)`` with weights ``w > 0``."""
    from scipy.sparse import coo_matrix

    graph = coo_matrix((w, (rows, cols)), shape=(Fa, Fb)).tocsr()
    if Fa <= Fb:
        return np.arange(Fa), _match(graph, Fa)
    return _match(graph.T.tocsr(), Fb), np.arange(Fb)


def _sparse_assignment(A: Tensor, B: Tensor, candidates: int, block_elements: int, progress: bool,
                       dense_limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows/cols of a maximum-similarity full matching between ``A`` and ``B`` (see module docstring),
    and the sorted keys ``row · Fb + col`` of the candidate edges it searched (None when dense)."""
    Fa, Fb = A.shape[0], B.shape[0]
    n = min(Fa, Fb)
    if n <= dense_limit:
        return (*_dense_assignment(A, B), None)
    rows, cols, sims = top_candidates(A, B, candidates, block_elements=block_elements, progress=progress)
    real = rows.astype(np.int64) * Fb + cols  # sorted, unique
    # The pairs (i, i), i < min(Fa, Fb), with their true similarity, keep a full matching possible.
    # Weights are similarity + 2 > 0 (scipy drops explicit zeros); for full matchings the offset is
    # a constant, so the assignment maximises the summed similarity over this graph.
    diag = np.arange(n, dtype=np.int64)
    extra = diag[~_in_sorted(diag * Fb + diag, real)]
    mr, mc = _solve(np.concatenate([rows, extra]), np.concatenate([cols, extra]),
                    np.concatenate([sims, edge_sims(A, B, extra, extra)]) + 2.0, Fa, Fb)
    ok = _in_sorted(mr.astype(np.int64) * Fb + mc, real)
    if ok.all():
        return mr, mc, real
    # Latents matched through non-candidate (i, i) pairs (and any nobody took): match them among
    # themselves with more candidates, then solve once more on the union of both edge sets.
    lr = np.setdiff1d(np.arange(Fa), mr[ok])
    lc = np.setdiff1d(np.arange(Fb), mc[ok])
    At, Bt = A[torch.as_tensor(lr, device=A.device)], B[torch.as_tensor(lc, device=A.device)]
    sr, sc, sub = _sparse_assignment(At, Bt, candidates * 2, block_elements, False, dense_limit)
    if sub is None:  # the remainder was solved densely: still add its best candidates
        er, ec, _ = top_candidates(At, Bt, candidates * 2, block_elements=block_elements)
    else:
        er, ec = sub // len(lc), sub % len(lc)
    r = np.concatenate([rows, lr[er], lr[sr]]).astype(np.int64)
    c = np.concatenate([cols, lc[ec], lc[sc]]).astype(np.int64)
    keys = np.unique(r * Fb + c)
    r, c = keys // Fb, keys % Fb
    return (*_solve(r, c, edge_sims(A, B, r, c) + 2.0, Fa, Fb), keys)


def _match(graph: Any, n_rows: int) -> np.ndarray:
    """For a biadjacency matrix with ``n_rows ≤ n_cols``: the column matched to each row."""
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    r, c = min_weight_full_bipartite_matching(graph, maximize=True)
    out = np.empty(n_rows, dtype=np.int64)
    out[r] = c
    return out


def assign(A: Tensor, B: Tensor, *, candidates: int = 32, block_elements: int = 2**24, progress: bool = False,
           dense_limit: int = DENSE_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """A one-to-one matching ``(rows, cols)`` of the rows of ``A (Fa, d)`` and ``B (Fb, d)`` (any
    scale: rows are normalised) maximising the summed cosine similarity; ``min(Fa, Fb)`` pairs.
    Problems (or remainders) with at most ``dense_limit`` pairs use the dense Hungarian solver."""
    if A.shape[-1] != B.shape[-1]:
        raise ShapeMismatchError(f"cannot match rows of width {A.shape[-1]} with rows of width {B.shape[-1]}")
    A, B = _unit(A), _unit(B.to(A.device))
    r, c, _ = _sparse_assignment(A, B, candidates, block_elements, progress, dense_limit)
    order = np.argsort(r, kind="stable")
    return r[order], c[order]


@dataclass
class LatentMatching:
    """The matching of SAE A's latents to SAE B's. Per latent of A: ``partner`` (index in B, −1 if
    none), ``decoder_cos`` / ``encoder_cos`` with it (NaN if none) and ``shared``."""

    partner: Tensor
    decoder_cos: Tensor
    encoder_cos: Tensor
    shared: Tensor
    threshold: float
    by: str
    criterion: str
    n_b: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shared_fraction(self) -> float:
        """Shared latents over ``min(F_a, F_b)`` (the most that can be shared)."""
        return float(self.shared.sum()) / min(len(self.partner), self.n_b)

    @property
    def orphans_a(self) -> Tensor:
        """Latents of A that are not shared (unmatched, or matched below the threshold)."""
        return (~self.shared).nonzero().flatten()

    @property
    def orphans_b(self) -> Tensor:
        shared_b = torch.zeros(self.n_b, dtype=torch.bool)
        shared_b[self.partner[self.shared]] = True
        return (~shared_b).nonzero().flatten()

    def summary(self) -> dict[str, Any]:
        m = self.partner >= 0
        return {
            "latents_a": len(self.partner), "latents_b": self.n_b, "matched": int(m.sum()),
            "by": self.by, "criterion": self.criterion, "threshold": self.threshold,
            "shared": int(self.shared.sum()), "shared_fraction": self.shared_fraction,
            "orphans_a": len(self.orphans_a), "orphans_b": len(self.orphans_b),
            "mean_decoder_cos": float(self.decoder_cos[m].mean()), "mean_encoder_cos": float(self.encoder_cos[m].mean()),
            **self.extra,
        }


def _directions(sae: SAE, which: str) -> Tensor:
    return sae.W_dec if which == "decoder" else sae.W_enc.T


@torch.no_grad()
def match_latents(
    sae_a: SAE, sae_b: SAE, *, by: str = "decoder", threshold: float = 0.7, shared: str = "both",
    candidates: int = 32, block_elements: int = 2**24, device: str | torch.device | None = None, progress: bool = False,
    dense_limit: int = DENSE_LIMIT,
) -> LatentMatching:
    """Match ``sae_a``'s latents one-to-one to ``sae_b``'s (see the module docstring).

    Args:
        by: what the assignment maximises: ``"decoder"`` cosine (default), ``"encoder"`` cosine, or
            ``"both"`` (their mean).
        threshold, shared: a matched pair is shared when its cosine exceeds ``threshold`` for
            ``"both"`` encoder and decoder (default) or for the ``"decoder"`` only.
        candidates: partners kept per latent in the sparse search (more = closer to dense, slower).
        block_elements: similarities computed at a time (memory bound of the search, in floats).
        device: where the search runs (default: sae_a's device).
        dense_limit: up to this many pairs the dense Hungarian solver is used (exact).
    """
    if by not in ("decoder", "encoder", "both") or shared not in ("both", "decoder"):
        raise ValueError(f"by must be decoder|encoder|both and shared both|decoder, got by={by!r}, shared={shared!r}")
    if sae_a.cfg.output_dim != sae_b.cfg.output_dim or sae_a.cfg.d_in != sae_b.cfg.d_in:
        raise ShapeMismatchError(
            f"SAEs of different widths cannot be matched: d_in {sae_a.cfg.d_in} vs {sae_b.cfg.d_in}, "
            f"d_out {sae_a.cfg.output_dim} vs {sae_b.cfg.output_dim}"
        )
    dev = torch.device(device) if device is not None else sae_a.device
    dec_a, dec_b = _unit(sae_a.W_dec.to(dev)), _unit(sae_b.W_dec.to(dev))
    enc_a, enc_b = _unit(sae_a.W_enc.T.to(dev)), _unit(sae_b.W_enc.T.to(dev))
    if by == "decoder":
        A, B = dec_a, dec_b
    elif by == "encoder":
        A, B = enc_a, enc_b
    else:  # the mean of both cosines is the dot product of the concatenated unit vectors / 2
        A, B = torch.cat([dec_a, enc_a], 1), torch.cat([dec_b, enc_b], 1)
    r, c = assign(A, B, candidates=candidates, block_elements=block_elements, progress=progress, dense_limit=dense_limit)
    Fa = dec_a.shape[0]
    rt, ct = torch.as_tensor(r, device=dev), torch.as_tensor(c, device=dev)
    partner = torch.full((Fa,), -1, dtype=torch.long)
    partner[r] = torch.as_tensor(c)
    dcos = torch.full((Fa,), float("nan"))
    ecos = torch.full((Fa,), float("nan"))
    dcos[r] = torch.as_tensor(edge_sims(dec_a, dec_b, rt, ct), dtype=torch.float32)
    ecos[r] = torch.as_tensor(edge_sims(enc_a, enc_b, rt, ct), dtype=torch.float32)
    ok = dcos > threshold
    if shared == "both":
        ok &= ecos > threshold
    return LatentMatching(partner, dcos, ecos, ok, threshold, by, shared, dec_b.shape[0])
