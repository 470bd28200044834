"""Robust data statistics for a run's start: input scale, ``b_dec`` and the normalised-MSE scale.

They come from the first ``init_batches`` batches, not from one: each batch gives its own estimate and
the median is used. Batches whose mean squared norm is more than :data:`OUTLIER_FACTOR` away from the
median, whose scale the training dtype cannot represent (all zero, ×1e-30 or ×1e30 in float32), or
whose variance is far below the others' (rows all the same vector) are left out of the statistics and not trained on (with a warning), as long as a strict majority of the first
batches remain. Data that cannot give a statistic is refused with
:class:`~sae_hooks.errors.DegenerateDataError` naming the statistic and the batch: no majority of usable
batches (with ``init_batches=1``: one degenerate batch), or rows that are all the same vector (no
variance to normalise the MSE by). Empty batches never get here: the trainer skips them.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import DegenerateDataError

#: a batch whose mean squared norm differs from the median by more than this factor is an outlier.
OUTLIER_FACTOR = 100.0
#: at most this many rows enter the geometric median.
MEDIAN_ROWS = 16384


def geometric_median(x: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm on the rows of ``x (N, d)``, started at the mean; returns ``(d,)`` (float64)."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            y = new
            break
        y = new
    return y


def _mean_sq_norm(x: Tensor, j: int, n: int, what: str) -> float:
    """``mean ||x||²`` of batch ``j`` (of ``n``), in float64 (so 1e-30 or 1e30 scales stay measurable)."""
    if x.shape[0] == 0:
        raise DegenerateDataError(f"{what}: batch {j + 1} of the first {n} is empty")
    return x.double().pow(2).sum(-1).mean().item()


def _unusable(msn: float, d: int, dtype: torch.dtype) -> str | None:
    """Why a batch with mean squared norm ``msn`` cannot set the scale in ``dtype`` (``None``: it can)."""
    fin = torch.finfo(dtype)
    if msn == 0:
        return "is 0 (all-zero rows)"
    if math.isfinite(msn) and msn / d < fin.tiny:
        return f"underflows {dtype}"
    if not math.isfinite(msn) or msn > fin.max:
        return f"overflows {dtype}"
    return None


def _degenerate(what: str, j: int, n: int, msn: float, why: str) -> DegenerateDataError:
    return DegenerateDataError(
        f"{what}: batch {j + 1} of the first {n} has mean squared norm {msn:.3g}, which {why}; "
        "it cannot set the scale. Check the data (or the source) feeding the first batches"
    )


def mean_sq_norms(batches: Sequence[Tensor], what: str, dtype: torch.dtype) -> list[float]:
    """``mean ||x||²`` of each batch ``(N, d)``; refuses a batch whose squares the training ``dtype``
    cannot hold (0, underflow, overflow) or that has no rows."""
    out = []
    for j, x in enumerate(batches):
        msn = _mean_sq_norm(x, j, len(batches), what)
        why = _unusable(msn, x.shape[-1], dtype)
        if why is not None:
            raise _degenerate(what, j, len(batches), msn, why)
        out.append(msn)
    return out


def robust_scale(batches: Sequence[Tensor], d: int, what: str, dtype: torch.dtype) -> float:
    """The constant ``c`` with ``median_batches E||c·x||² = d``."""
    return math.sqrt(d / statistics.median(mean_sq_norms(batches, what, dtype)))


def _variance(x: Tensor) -> float:
    """``mean ||x − mean x||²`` of a batch ``(N, d)``, in float64."""
    return (x.double() - x.double().mean(0)).pow(2).sum(-1).mean().item()


def inlier_mask(batches: Sequence[Tensor], what: str, dtype: torch.dtype) -> list[bool]:
    """Which batches to compute the statistics from and train on; warns about the others.

    An outlier is a batch whose mean squared norm is more than :data:`OUTLIER_FACTOR` away from the median,
    or not representable in ``dtype`` (all zero, ×1e-30, ×1e30 in float32), or whose variance is more than
    :data:`OUTLIER_FACTOR` below the median variance (e.g. every row the same vector: it would drag ``b_dec``
    to that point). A strict majority of the batches must be inliers, else :class:`DegenerateDataError`
    names the first bad batch (so with ``init_batches=1`` a degenerate first batch is refused)."""
    n = len(batches)
    msn = [_mean_sq_norm(x, j, n, what) for j, x in enumerate(batches)]
    whys = [_unusable(m, x.shape[-1], dtype) for m, x in zip(msn, batches)]
    var = [_variance(x) for x in batches]
    med, med_var = statistics.median(msn), statistics.median(var)
    reasons = []
    for m, v, w in zip(msn, var, whys):
        if w is not None:
            reasons.append(w)
        elif not med / OUTLIER_FACTOR <= m <= med * OUTLIER_FACTOR:
            reasons.append(f"more than {OUTLIER_FACTOR:g}x away from the median {med:.3g}")
        elif v < med_var / OUTLIER_FACTOR:
            reasons.append(f"variance {v:.3g}, more than {OUTLIER_FACTOR:g}x below the median {med_var:.3g}")
        else:
            reasons.append(None)
    keep = [r is None for r in reasons]
    if 2 * sum(keep) <= n:
        j = next((i for i, w in enumerate(whys) if w is not None), None)
        if j is not None:
            err = _degenerate(what, j, n, msn[j], whys[j])
            if n > 1:
                err.args = (f"{err.args[0]} (only {sum(keep)} of the {n} batches could, not a majority)",)
            raise err
        raise DegenerateDataError(
            f"{what}: only {sum(keep)} of the first {n} batches are usable (mean squared norms "
            f"{', '.join(f'{m:.3g}' for m in msn)}; variances {', '.join(f'{v:.3g}' for v in var)}): "
            "no majority to set the statistics from"
        )
    if not all(keep):
        bad = [f"batch {j + 1}: mean squared norm {msn[j]:.3g}, {reasons[j]}" for j in range(n) if not keep[j]]
        warnings.warn(
            f"{what}: {n - sum(keep)} of the first {n} batches are outliers ({'; '.join(bad)}); "
            "left out of the statistics and not trained on",
            RuntimeWarning, stacklevel=3,
        )
    return keep


def inliers(batches: Sequence[Tensor], what: str, dtype: torch.dtype) -> list[Tensor]:
    """The batches whose mean squared norm is within :data:`OUTLIER_FACTOR` of the median."""
    return [b for b, k in zip(batches, inlier_mask(batches, what, dtype)) if k]


def robust_centre_and_mse_scale(targets: Sequence[Tensor], what: str, dtype: torch.dtype, centre: str) -> tuple[Tensor | None, float]:
    """``(b_dec, mse_scale)`` from normalised reconstruction targets ``(N, d)`` of the first batches:
    ``b_dec`` the geometric median (or mean) of the pooled inlier rows (``centre="zeros"``: ``None``),
    ``mse_scale = 1 / median_batches mean ||y − mean y||²``; rows without variance are refused."""
    keep = inliers(targets, what, dtype)
    msn = statistics.median(mean_sq_norms(keep, what, dtype))
    var = statistics.median([_variance(y) for y in keep])
    if not var > 1e-12 * msn:
        raise DegenerateDataError(
            f"mse_scale: the variance of the {what} over the first {len(targets)} batches is {var:.3g} (mean squared "
            f"norm {msn:.3g}): every row is the same vector, so there is nothing to normalise the MSE by"
        )
    b_dec = None
    if centre != "zeros":
        pooled = torch.cat(list(keep))[:MEDIAN_ROWS]
        b_dec = geometric_median(pooled) if centre == "geometric_median" else pooled.double().mean(0)
    return b_dec, 1.0 / var
