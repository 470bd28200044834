"""Reconstruction metrics of an SAE on activations: FVU, explained variance, L0, dead fraction.

Definitions (``x`` is ``(N, d)`` activations, ``x_hat`` the reconstruction):

* ``fvu = Σ ||x − x_hat||² / Σ ||x − mean(x)||²`` over the whole set, the mean being the dataset mean
  per dimension (SAELens's ``explained_variance`` is ``1 − fvu``);
* ``l0``: mean number of nonzero latents per token; ``dead_fraction``: latents that never fired on
  the evaluation tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..saes.base import SAE, SparseLatents


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained over a set of rows ``(..., d)`` (dataset mean per dimension)."""
    x, x_hat = x.detach().double().reshape(-1, x.shape[-1]), x_hat.detach().double().reshape(-1, x_hat.shape[-1])
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    return 1.0 - fvu(x, x_hat)


def l0(latents: Tensor | SparseLatents) -> float:
    """Mean number of nonzero latents per token."""
    if isinstance(latents, SparseLatents):
        return float((latents.values != 0).sum(-1).float().mean())
    return float((latents != 0).sum(-1).float().mean())


def fired(latents: Tensor | SparseLatents, d_sae: int) -> Tensor:
    """``(d_sae,)`` bool: which latents are nonzero in at least one row."""
    if isinstance(latents, SparseLatents):
        out = torch.zeros(d_sae, dtype=torch.bool, device=latents.values.device)
        out[latents.indices[latents.values != 0]] = True
        return out
    return (latents != 0).reshape(-1, latents.shape[-1]).any(0)


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterable[Tensor]) -> dict[str, float]:
    """FVU, explained variance, L0 and dead fraction of ``sae`` on batches of ``(N, d_in)`` activations.

    FVU is computed over all batches together (sums of squares accumulated in float64).
    """
    sq_err = 0.0
    n = 0
    s1: Tensor | None = None
    s2 = 0.0
    l0_sum = 0.0
    alive = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)
    for x in batches:
        x = x.reshape(-1, x.shape[-1]).to(sae.device)
        latents, state = sae.encode_with_state(x)
        x_hat = sae.reconstruct(x, latents, state).to(x.dtype)
        xd = x.double()
        sq_err += float((xd - x_hat.double()).pow(2).sum())
        s1 = xd.sum(0) if s1 is None else s1 + xd.sum(0)
        s2 += float(xd.pow(2).sum())
        n += x.shape[0]
        l0_sum += l0(latents) * x.shape[0]
        alive |= fired(latents, sae.cfg.d_sae)
    if n == 0 or s1 is None:
        raise ValueError("reconstruction_metrics got no activations")
    total_var = s2 - float(s1.pow(2).sum()) / n
    f = sq_err / max(total_var, 1e-30)
    return {
        "fvu": f,
        "explained_variance": 1.0 - f,
        "l0": l0_sum / n,
        "dead_fraction": float((~alive).float().mean()),
        "tokens": n,
    }
