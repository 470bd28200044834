"""Description length of SAE latents (Ayonrinde, Pearce & Sharkey, "Interpretability as Compression",
arXiv 2410.11179), in bits per token.

Quantisation at a precision ``Δ`` (one value shared by every latent): an active value ``a ≠ 0`` falls
in the histogram bin ``floor(a / Δ)``, is reconstructed at the bin centre ``(floor(a/Δ) + ½)·Δ``, and
"inactive" (``a = 0``) is its own outcome. Binning with ``floor`` makes the bins at ``2Δ`` unions of
the bins at ``Δ``, so every count below is non-increasing as ``Δ`` doubles.

* ``entropy_bits`` = ``Σ_i H_i``: the Shannon entropy (bits) of each latent's quantised outcome
  distribution over the evaluation tokens, summed over latents -- the paper's reported measure. A
  binary latent costs at most 1 bit.
* ``bound_bits`` = ``L0 · (B + log2 F)``: name the active latents (``log2 F`` bits each) and send each
  value with ``B = log2(#bins spanned by the active values)`` bits. It dominates ``entropy_bits``
  whenever ``L0 ≥ e``: ``Σ_i H_i ≤ Σ_i h(p_i) + L0·B`` and ``Σ_i h(p_i) ≤ L0·(log2(F/L0) + log2 e)``.
* The dense baseline of raw activations ``x (N, d)`` at the same precision: ``dense_bits = d · B_x``
  with ``B_x = log2(#bins spanned by x)``, and the tighter ``dense_entropy_bits`` (per-dimension
  entropies summed).
* :func:`find_precision`: the coarsest ``Δ`` on a halving grid at which the FVU of the quantised
  reconstruction (or, given a model, the CE loss with it spliced in) degrades by at most a tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..saes.base import SAE, SparseLatents


def _entries(latents: Tensor | SparseLatents) -> tuple[Tensor, Tensor, int, int]:
    """(column index, value) of the nonzero entries, the number of tokens and of latents."""
    if isinstance(latents, SparseLatents):
        vals = latents.values.reshape(-1, latents.values.shape[-1])
        idx = latents.indices.reshape(-1, latents.indices.shape[-1])
        keep = vals != 0
        return idx[keep], vals[keep], vals.shape[0], latents.d_sae
    dense = latents.reshape(-1, latents.shape[-1])
    rows, cols = dense.nonzero(as_tuple=True)
    return cols, dense[rows, cols], dense.shape[0], dense.shape[-1]


def _xlogx(p: Tensor) -> Tensor:
    return torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))


def _bins(values: Tensor, precision: float) -> Tensor:
    return torch.floor(values.double() / precision).long()


@torch.no_grad()
def description_length(latents: Tensor | SparseLatents, precision: float) -> dict[str, float]:
    """Bits per token of ``latents`` (``(..., F)`` dense, or sparse) quantised at ``precision``.

    Returns ``entropy_bits``, ``bound_bits``, ``bits_per_value`` (``B``), ``l0``, ``n_latents``,
    ``tokens``, ``precision`` (definitions in the module docstring)."""
    if not precision > 0:
        raise ValueError(f"precision must be > 0, got {precision}")
    cols, vals, n, F = _entries(latents)
    if n == 0:
        raise ValueError("description_length got no tokens")
    q = _bins(vals, precision)
    if q.numel():
        qmin = int(q.min())
        pair = cols.long() * (int(q.max()) - qmin + 1) + (q - qmin)
        _, counts = torch.unique(pair, return_counts=True)
        active = -_xlogx(counts.double() / n).sum()
        fired = torch.bincount(cols.long(), minlength=F).double()
        levels = int(q.max()) - qmin + 1
    else:
        active, fired, levels = torch.zeros((), dtype=torch.float64), torch.zeros(F, dtype=torch.float64), 1
    inactive = -_xlogx((n - fired) / n).sum()
    l0 = float(fired.sum()) / n
    B = math.log2(levels)
    return {
        "entropy_bits": float(active + inactive),
        "bound_bits": l0 * (B + math.log2(F)),
        "bits_per_value": B,
        "l0": l0,
        "n_latents": F,
        "tokens": n,
        "precision": precision,
    }


@torch.no_grad()
def dense_description_length(x: Tensor, precision: float) -> dict[str, float]:
    """The dense baseline for raw activations ``x (..., d)`` at ``precision``: ``dense_bits = d · B_x``
    and ``dense_entropy_bits`` = the sum over dimensions of each one's quantised entropy."""
    x = x.reshape(-1, x.shape[-1])
    n, d = x.shape
    q = _bins(x, precision)
    qmin = int(q.min())
    span = int(q.max()) - qmin + 1
    pair = torch.arange(d, device=x.device)[None, :] * span + (q - qmin)
    _, counts = torch.unique(pair.reshape(-1), return_counts=True)
    B = math.log2(span)
    return {"dense_bits": d * B, "dense_entropy_bits": float(-_xlogx(counts.double() / n).sum()),
            "bits_per_value": B, "d": d, "tokens": n, "precision": precision}


def quantize(latents: Tensor | SparseLatents, precision: float) -> Tensor | SparseLatents:
    """Active values moved to their bin centre ``(floor(a/Δ) + ½)·Δ``; zeros stay zero."""
    def q(v: Tensor) -> Tensor:
        return torch.where(v != 0, (torch.floor(v / precision) + 0.5) * precision, v)

    if isinstance(latents, SparseLatents):
        return SparseLatents(q(latents.values), latents.indices, latents.d_sae)
    return q(latents)


def quantized_sae(sae: SAE, precision: float) -> Callable[[Tensor], Tensor]:
    """``x -> reconstruct(x, quantize(encode(x)))``, to splice with :func:`~sae_hooks.eval.splice.splice_metrics`."""
    def forward(x: Tensor) -> Tensor:
        lat, state = sae.encode_with_state(x)
        return sae.reconstruct(x, quantize(lat, precision), state).to(x.dtype)

    return forward


def _fvu(sae_fn: Callable[[Tensor], Tensor], acts: Sequence[Tensor]) -> float:
    from .reconstruction import fvu

    x = torch.cat([a.reshape(-1, a.shape[-1]) for a in acts])
    return fvu(x, sae_fn(x))


def _max_abs(sae: SAE, acts: Sequence[Tensor]) -> float:
    m = 0.0
    for a in acts:
        lat, _ = sae.encode_with_state(a)
        v = lat.values if isinstance(lat, SparseLatents) else lat
        m = max(m, float(v.abs().max()) if v.numel() else 0.0)
    return m


@torch.no_grad()
def find_precision(
    sae: SAE, acts: Sequence[Tensor], tolerance: float = 0.01, *, splice: Any = None, token_batches: Iterable[Any] = (),
    steps: int = 20,
) -> dict[str, float]:
    """The coarsest precision ``Δ = max|a| / 2^j`` (``j = 0 .. steps``) whose quantised latents degrade
    the FVU on ``acts`` by at most ``tolerance`` (absolute) -- or, with ``splice`` (a splice runner
    from :func:`~sae_hooks.eval.splice.hooks_splice_runner`) and ``token_batches``, the CE loss with the
    SAE spliced in by at most ``tolerance`` nats. Returns ``precision``, ``degradation``, ``metric``."""
    from .splice import splice_metrics

    batches = list(token_batches)
    if splice is not None:
        if not batches:
            raise ValueError("find_precision with a splice runner needs token_batches")
        metric = "ce_sae"
        base = splice_metrics(splice, sae, batches)["ce_sae"]

        def cost(p: float) -> float:
            return splice_metrics(splice, quantized_sae(sae, p), batches)["ce_sae"] - base
    else:
        metric = "fvu"
        base = _fvu(sae, acts)

        def cost(p: float) -> float:
            return _fvu(quantized_sae(sae, p), acts) - base

    top = _max_abs(sae, acts)
    if top == 0:
        raise ValueError("every latent is zero on these activations: nothing to quantise")
    for j in range(steps + 1):
        p = top / 2**j
        c = cost(p)
        if c <= tolerance:
            return {"precision": p, "degradation": c, "metric": metric}
    return {"precision": top / 2**steps, "degradation": c, "metric": metric}


@torch.no_grad()
def mdl_report(sae: SAE, acts: Sequence[Tensor], precision: float | None = None, tolerance: float = 0.01,
               **search: Any) -> dict[str, Any]:
    """Bits per token of ``sae``'s latents and of the raw activations at one precision (found by
    :func:`find_precision` unless given), with the L0 and the FVU at that precision."""
    found = {"precision": precision, "degradation": float("nan"), "metric": "given"} if precision else \
        find_precision(sae, acts, tolerance, **search)
    p = float(found["precision"])
    x = torch.cat([a.reshape(-1, a.shape[-1]) for a in acts])
    lat, _ = sae.encode_with_state(x)
    dl = description_length(lat, p)
    dense = dense_description_length(x, p)
    return {**dl, "dense_bits": dense["dense_bits"], "dense_entropy_bits": dense["dense_entropy_bits"],
            "dense_bits_per_value": dense["bits_per_value"], "fvu_quantized": _fvu(quantized_sae(sae, p), acts),
            "fvu": _fvu(sae, acts), "search": found}
