"""One pass over the data collects everything a feature dashboard shows, for every latent at once.

The stream is a sequence of *events*: a latent firing (value > 0) on a token. Per batch, all events
are handled with a few vectorised torch operations (no Python loop over latents):

* counts, sums and maxima per latent (``index_add_`` / ``scatter_reduce_``), and per layer for
  multi-layer SAEs;
* a histogram per latent on fixed log-spaced bins (``bins_per_decade`` per decade between
  ``hist_lo`` and ``hist_hi``, plus an under- and an overflow bin);
* two streaming top-k structures per latent (:class:`LatentTopK`): the ``n_top`` largest activations,
  and a uniform sample of ``n_samples`` firings without replacement (each event gets a random key and
  the largest keys are kept: bottom-k / reservoir sampling), later split into activation quantile bands.

An event entering either structure stores its context: the token ids of a window around it
(``left`` tokens before, ``right`` after, ``-1`` outside the sequence), the latent's activation on
each token of that window (float16), its layer, and the ``n_coactive`` strongest *other* latents on
that token. Memory is fixed by ``d_sae`` and the settings, not by the number of tokens:
about ``d_sae * (n_top + n_samples) * (6 * (left + right + 1) + 4 * n_coactive + 18)`` bytes
(≈0.53 GB for ``d_sae`` 131,072 with the defaults), plus the histograms (``4 * d_sae * n_bins``, n_bins = 130
by default; 68 MB): 592 MB measured by ``benchmarks/bench_dashboard.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...errors import ShapeMismatchError
from ...saes.base import SparseLatents


@dataclass
class CollectorSettings:
    """What :class:`FeatureCollector` keeps per latent (see the module docstring)."""

    n_top: int = 10
    n_samples: int = 20
    left: int = 10
    right: int = 4
    n_coactive: int = 8
    hist_lo: float = 1e-4
    hist_hi: float = 1e4
    bins_per_decade: int = 16
    seed: int = 0

    @property
    def window(self) -> int:
        return self.left + self.right + 1

    @property
    def n_bins(self) -> int:
        """Log-spaced bins plus the under- and overflow bins."""
        return round(math.log10(self.hist_hi / self.hist_lo) * self.bins_per_decade) + 2

    def bin_edges(self) -> list[float]:
        """The ``n_bins - 1`` edges: bin 0 is ``(0, hist_lo)``, the last bin ``[hist_hi, inf)``."""
        n = self.n_bins - 1
        return [self.hist_lo * 10 ** (i / self.bins_per_decade) for i in range(n)]


class LatentTopK:
    """For each of ``d_sae`` latents, the ``k`` events with the largest keys seen so far, with payloads.

    ``keys`` is ``(d_sae, k)``, sorted in descending order per row, ``-inf`` where empty; ``slots``
    ``(d_sae, k)`` says which row of the payload pool (``(d_sae * k, *shape)`` per field) holds each
    entry's payload. :meth:`push` merges a batch of events with one sort of the batch's candidates and
    one ``topk`` over the rows of the latents they touch; only the keys and slot numbers of those rows
    move, and payloads are computed and written for the events that actually enter.
    """

    def __init__(self, d_sae: int, k: int, fields: dict[str, tuple[tuple[int, ...], torch.dtype, float]]):
        self.k = k
        self.keys = torch.full((d_sae, k), -math.inf)
        self.slots = torch.arange(d_sae * k).view(d_sae, k)
        self.pool = {name: torch.full((d_sae * k, *shape), fill, dtype=dtype) for name, (shape, dtype, fill) in fields.items()}

    def push(self, lat: Tensor, key: Tensor, payload_fn) -> None:  # noqa: ANN001 - (events (m,)) -> dict
        """Offer events (latent ``lat (E,)``, ``key (E,)``); ``payload_fn(event_index (m,))`` returns the
        payload fields of the events that enter (a dict of ``(m, *shape)`` tensors)."""
        k = self.k
        ev = torch.nonzero(key > self.keys[lat, -1]).squeeze(1)  # only events that beat the current k-th key
        if ev.numel() == 0:
            return
        lat, key = lat[ev], key[ev]
        order = torch.argsort(key, descending=True, stable=True)
        order = order[torch.argsort(lat[order], stable=True)]  # grouped by latent, descending key within
        lat, key, ev = lat[order], key[order], ev[order]
        n = lat.numel()
        ar = torch.arange(n)
        new_group = torch.ones(n, dtype=torch.bool)
        new_group[1:] = lat[1:] != lat[:-1]
        rank = ar - torch.where(new_group, ar, 0).cummax(0).values
        keep = rank < k
        lat, key, ev, rank = lat[keep], key[keep], ev[keep], rank[keep]
        latents, inv = torch.unique_consecutive(lat, return_inverse=True)
        u = latents.numel()
        cand = torch.full((u, k), -math.inf)
        cand[inv, rank] = key
        cand_ev = torch.full((u, k), -1, dtype=torch.long)
        cand_ev[inv, rank] = ev
        top = torch.cat([self.keys[latents], cand], 1).topk(k, dim=1)
        chosen = torch.zeros(u, 2 * k, dtype=torch.bool).scatter_(1, top.indices, True)
        # Per row, as many old entries leave as new ones enter: pair them in row-major order.
        old_slots = self.slots[latents]
        free = old_slots[~chosen[:, :k]]
        won = chosen[:, k:]
        entering = cand_ev[won]
        real = entering >= 0  # an empty (-inf) candidate may be "chosen" in a row with fewer than k events
        if bool(real.any()):
            payload = payload_fn(entering[real])
            target = free[real]
            for name, pool in self.pool.items():
                pool[target] = payload[name].to(pool.dtype)
        new_slots = torch.full((u, k), -1, dtype=torch.long)
        new_slots[won] = free
        self.slots[latents] = torch.cat([old_slots, new_slots], 1).gather(1, top.indices)
        self.keys[latents] = top.values

    def fields(self) -> dict[str, Tensor]:
        """Keys and payloads in entry order: ``{"keys": (d_sae, k), field: (d_sae, k, *shape)}``."""
        return {"keys": self.keys, **{name: pool[self.slots] for name, pool in self.pool.items()}}


@dataclass
class FeatureStats:
    """What :meth:`FeatureCollector.finish` returns (all CPU tensors; ``d_sae`` rows)."""

    settings: CollectorSettings
    n_tokens: int  # tokens seen (per layer)
    n_layers: int
    count: Tensor  # (d_sae,) firings over all (token, layer) examples
    sum: Tensor  # (d_sae,) float64 sum of activations when firing
    max: Tensor  # (d_sae,)
    hist: Tensor  # (d_sae, n_bins) int
    layer_count: Tensor  # (n_layers, d_sae)
    layer_sum: Tensor  # (n_layers, d_sae)
    top: dict[str, Tensor]  # keys (d_sae, n_top) and payload fields
    samples: dict[str, Tensor]  # keys (d_sae, n_samples) and payload fields
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(self.count.numel())

    @property
    def density(self) -> Tensor:
        """Fraction of (token, layer) examples on which each latent fires, ``(d_sae,)``."""
        return self.count.double() / max(1, self.n_tokens * self.n_layers)

    @property
    def mean(self) -> Tensor:
        """Mean activation when firing, ``(d_sae,)`` (0 for dead latents)."""
        return (self.sum / self.count.clamp_min(1)).float()


class FeatureCollector:
    """Streams latents batch by batch; :meth:`finish` returns :class:`FeatureStats`.

    Call :meth:`update` once per token batch (and per layer for a multi-layer SAE) with the batch's
    token ids ``(B, S)``, the mask of tokens the latents belong to ``(B, S)`` and the latents of those
    tokens in row-major order: dense ``(n, d_sae)`` or :class:`~sae_hooks.SparseLatents` ``(n, k)``.
    """

    def __init__(self, d_sae: int, settings: CollectorSettings | None = None, n_layers: int = 1):
        s = self.settings = settings or CollectorSettings()
        self.d_sae, self.n_layers = d_sae, n_layers
        self.n_tokens = 0
        self.count = torch.zeros(d_sae, dtype=torch.int64)
        self.sum = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae)
        self.hist = torch.zeros(d_sae, s.n_bins, dtype=torch.int32)
        self.layer_count = torch.zeros(n_layers, d_sae, dtype=torch.int64)
        self.layer_sum = torch.zeros(n_layers, d_sae, dtype=torch.float64)
        fields = {
            "value": ((), torch.float32, 0.0),
            "tokens": ((s.window,), torch.int32, -1),
            "acts": ((s.window,), torch.float16, 0.0),
            "coactive": ((s.n_coactive,), torch.int32, -1),
            "layer": ((), torch.int16, 0),
        }
        self.top = LatentTopK(d_sae, s.n_top, fields)
        self.samples = LatentTopK(d_sae, s.n_samples, fields)
        self._gen = torch.Generator().manual_seed(s.seed)
        self._log_lo = math.log10(s.hist_lo)

    @torch.no_grad()
    def update(self, tokens: Tensor, keep: Tensor, latents: Tensor | SparseLatents, layer: int = 0) -> None:
        """Add one batch: ``tokens (B, S)``, ``keep (B, S)`` bool, latents of the ``n = keep.sum()`` kept tokens."""
        s = self.settings
        tokens, keep = tokens.cpu(), keep.cpu().bool()
        if not isinstance(latents, SparseLatents):  # dense: keep each row's firing latents only
            dense = latents.detach().float().cpu().reshape(-1, latents.shape[-1])
            width = dense.shape[-1]
            most = int((dense > 0).sum(1).max()) if dense.numel() else 0
            latents = SparseLatents(*dense.topk(max(1, min(most, width)), dim=1), width)
        values, indices = latents.values.detach().float().cpu(), latents.indices.detach().cpu()
        values, indices = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
        n, width = values.shape[0], latents.d_sae
        if width != self.d_sae:
            raise ShapeMismatchError(f"latents have d_sae={width}, the collector was made for {self.d_sae}")
        if n != int(keep.sum()):
            raise ShapeMismatchError(f"{n} latent rows for {int(keep.sum())} kept tokens")
        if layer == 0:
            self.n_tokens += n
        # Events: (row, latent, value) for every firing.
        fire = values > 0
        row = torch.arange(n).unsqueeze(1).expand_as(values)[fire]
        lat, val = indices[fire], values[fire]
        if lat.numel() == 0:
            return
        self.count.index_add_(0, lat, torch.ones_like(lat))
        self.sum.index_add_(0, lat, val.double())
        self.max.scatter_reduce_(0, lat, val, "amax")
        self.layer_count[layer].index_add_(0, lat, torch.ones_like(lat))
        self.layer_sum[layer].index_add_(0, lat, val.double())
        b = ((torch.log10(val) - self._log_lo) * s.bins_per_decade).floor().long() + 1
        b = b.clamp(0, s.n_bins - 1)
        self.hist.view(-1).index_add_(0, lat * s.n_bins + b, torch.ones_like(b, dtype=torch.int32))

        # Where each kept token's row is, for the windows; -1 outside the sequence or for dropped tokens.
        B, S = tokens.shape
        pad = torch.full((B, S + s.left + s.right), -1, dtype=torch.long)
        pos2row = pad.clone()
        pos2row[:, s.left : s.left + S][keep] = torch.arange(n)
        pad[:, s.left : s.left + S] = tokens
        tok_b, tok_s = torch.nonzero(keep, as_tuple=True)  # (n,) batch and position of each row
        offsets = torch.arange(s.window)

        # The batch's events sorted by (row, latent): a window's activations are found by binary search.
        ev_keys, ev_order = (row * self.d_sae + lat).sort()
        ev_vals = val[ev_order]

        def value_at(rows: Tensor, lats: Tensor) -> Tensor:
            """Activation of latent ``lats[i]`` on rows ``rows[i, :]`` (0 where it does not fire or ``rows`` is -1)."""
            q = rows.clamp_min(0) * self.d_sae + lats.view(-1, 1)
            pos = torch.searchsorted(ev_keys, q).clamp_max(ev_keys.numel() - 1)
            hit = (ev_keys[pos] == q) & (rows >= 0)
            return torch.where(hit, ev_vals[pos], 0.0)

        # Each row's strongest latents, sorted once per row (not once per event).
        c = s.n_coactive
        row_vals, order = values.sort(dim=1, descending=True)
        row_idx = indices.gather(1, order)
        row_vals, row_idx = row_vals[:, : c + 1], row_idx[:, : c + 1]
        if row_idx.shape[1] < c + 1:
            fill = c + 1 - row_idx.shape[1]
            row_vals = torch.cat([row_vals, row_vals.new_zeros(n, fill)], 1)
            row_idx = torch.cat([row_idx, row_idx.new_full((n, fill), -1)], 1)

        def coactive(rows: Tensor, lats: Tensor) -> Tensor:
            """The ``n_coactive`` strongest other latents firing on each event's token (``-1``: none)."""
            v, i = row_vals[rows], row_idx[rows]
            after_self = (i == lats.view(-1, 1)).cumsum(1) > 0  # drop the latent itself, shift the rest left
            i = torch.where(after_self[:, :c], i[:, 1:], i[:, :c])
            v = torch.where(after_self[:, :c], v[:, 1:], v[:, :c])
            return torch.where(v > 0, i, -1)

        def payload(ev: Tensor) -> dict[str, Tensor]:
            r, la = row[ev], lat[ev]
            bb, ss = tok_b[r], tok_s[r]
            cols = ss.view(-1, 1) + offsets  # window in padded coordinates
            wrows = pos2row[bb.view(-1, 1), cols]
            return {
                "value": val[ev],
                "tokens": pad[bb.view(-1, 1), cols],
                "acts": value_at(wrows, la),
                "coactive": coactive(r, la),
                "layer": torch.full_like(la, layer),
            }

        self.top.push(lat, val, payload)
        self.samples.push(lat, torch.rand(lat.numel(), generator=self._gen), payload)

    def finish(self) -> FeatureStats:
        return FeatureStats(
            settings=self.settings, n_tokens=self.n_tokens, n_layers=self.n_layers, count=self.count, sum=self.sum,
            max=self.max, hist=self.hist, layer_count=self.layer_count, layer_sum=self.layer_sum,
            top=self.top.fields(), samples=self.samples.fields(),
        )
