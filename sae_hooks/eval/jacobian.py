"""Jacobian sparsity of a JSAE pair over a dataset (methods §2.4-2.5).

For MLP inputs ``x`` the pair's sparse Jacobian ``J (..., k_out, k_in)`` between the output and input
SAE latents is formed on the active entries only (:meth:`JacobianSAEPair.jacobian`). Reported per
token, averaged over all tokens of all batches:

* ``abs_above_<t>``: the number of entries with ``|J| > t`` (JSAE's ``jac_abs_above_t``), out of
  ``k_out · k_in`` (``entries``);
* ``l1``: ``Σ |J|`` (what the Jacobian sparsity loss penalises, before its coefficient).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def jacobian_sparsity(pair: Any, batches: Iterable[Tensor], thresholds: tuple[float, ...] = (0.005, 0.01, 0.02)) -> dict[str, float]:
    """Per-token Jacobian sparsity of ``pair`` (a :class:`~sae_hooks.saes.jacobian.JacobianSAEPair`)
    on batches of MLP inputs ``(..., d_model)``."""
    counts = dict.fromkeys(thresholds, 0.0)
    l1, n, entries = 0.0, 0, 0
    for x in batches:
        a = pair.jacobian(x).values.abs().flatten(-2)  # (..., k_out * k_in)
        a = a.reshape(-1, a.shape[-1])
        n += a.shape[0]
        entries = a.shape[-1]
        l1 += float(a.sum())
        for t in thresholds:
            counts[t] += float((a > t).sum())
    if n == 0:
        raise ValueError("jacobian_sparsity got no tokens")
    return {**{f"abs_above_{t:g}": c / n for t, c in counts.items()}, "l1": l1 / n, "entries": entries, "tokens": n}
