"""Robust data statistics for a run's start: input scale, ``b_dec`` and the normalised-MSE scale.

They come from the first ``init_batches`` batches, not from one: each batch gives its own estimate and
the median is used, batches whose mean squared norm is more than :data:`OUTLIER_FACTOR` away from the
median are left out of ``b_dec`` and ``mse_scale`` (with a warning), and a batch that cannot give a
statistic at all is refused with :class:`~sae_hooks.errors.DegenerateDataError` naming it: all zero,
a scale whose squares under- or overflow the training dtype (e.g. ×1e-30 or ×1e30 in float32), or rows
that are all the same vector (no variance to normalise by).
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


def mean_sq_norms(batches: Sequence[Tensor], what: str, dtype: torch.dtype) -> list[float]:
    """``mean ||x||²`` of each batch ``(N, d)``; refuses a batch whose squares the training ``dtype``
    cannot hold (0, underflow, overflow)."""
    fin = torch.finfo(dtype)
    out = []
    for j, x in enumerate(batches):
        if x.shape[0] == 0:
            raise DegenerateDataError(f"{what}: batch {j + 1} of the first {len(batches)} is empty")
        msn = x.double().pow(2).sum(-1).mean().item()
        per_elem = msn / x.shape[-1]
        if not math.isfinite(msn) or per_elem < fin.tiny or msn > fin.max:
            why = "is 0 (all-zero rows)" if msn == 0 else (
                f"underflows {dtype}" if math.isfinite(msn) and per_elem < fin.tiny else f"overflows {dtype}")
            raise DegenerateDataError(
                f"{what}: batch {j + 1} of the first {len(batches)} has mean squared norm {msn:.3g}, which {why}; "
                "it cannot set the scale. Check the data (or the source) feeding the first batches"
            )
        out.append(msn)
    return out


def robust_scale(batches: Sequence[Tensor], d: int, what: str, dtype: torch.dtype) -> float:
    """The constant ``c`` with ``median_batches E||c·x||² = d``."""
    return math.sqrt(d / statistics.median(mean_sq_norms(batches, what, dtype)))


def inlier_mask(batches: Sequence[Tensor], what: str, dtype: torch.dtype) -> list[bool]:
    """Which batches have a mean squared norm within :data:`OUTLIER_FACTOR` of the median (warns about the others)."""
    msn = mean_sq_norms(batches, what, dtype)
    med = statistics.median(msn)
    keep = [med / OUTLIER_FACTOR <= m <= med * OUTLIER_FACTOR for m in msn]
    if not all(keep):
        warnings.warn(
            f"{what}: {keep.count(False)} of the first {len(batches)} batches have a mean squared norm more than "
            f"{OUTLIER_FACTOR:g}x away from the median {med:.3g}; left out of the statistics and not trained on",
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
    var = statistics.median([(y - y.mean(0)).double().pow(2).sum(-1).mean().item() for y in keep])
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
