"""Training losses of the research methods of issue 11 (inputs already in the SAE's normalised coordinates).

* ``signed_topk`` (SplInterp's sparsifier): ``mse_scale · mean ||x − x_hat||²`` on the ``k`` entries of
  largest magnitude, signs kept; sparse forward and backward (gather + ``embedding_bag``). No AuxK.
* ``mutual_choice`` / ``feature_choice`` (Ayonrinde 2024): ``mse_scale · mean ||x − x_hat||²`` on the
  batch selection (:mod:`sae_hooks.saes.choice`) plus ``aux_coefficient ·`` :func:`aux_zipf_loss`
  (or OpenAI's AuxK with ``aux="k"``). Updates the inference thresholds and ``feature_density``.
* ``matryoshka`` (Bussmann et al. 2025): BatchTopK activations, ``mse_scale · Σ_g w_g mean ||x − x_hat_g||²``
  over the nested prefixes (``w_g = 1/G`` by default, the mean over prefixes as in Bussmann's code and
  dictionary_learning) plus AuxK on the full reconstruction's residual. Updates the BatchTopK threshold.

``aux_zipf_loss``. The paper's text (arXiv 2411.02124) was not readable from here; only its abstract and
reviews were ("generalises aux_k_loss to mitigate dead and underutilised features"; "the Zipf distribution
fits the feature densities except at the lower end"). Our definition, which reduces to AuxK exactly when
every feature is either dead or at/above its Zipf-expected density:

1. rank the features by their firing density ``d_i`` (EMA over training batches), rank ``r_i = 1`` the most
   used; fit ``log d = c − α log r`` by least squares on the upper half of the ranks with ``d > 0`` (or
   fix ``α`` and fit ``c`` only) — the Zipf curve ``e_i = exp(c)·r_i^-α``;
2. under-use weight ``w_i = clamp(1 − d_i / e_i, 0, 1)`` (1 for a dead feature, 0 at or above the curve);
3. per token, the ``aux_k`` features with the largest ``w_i · ReLU(pre_i)`` among ``w_i > 0`` reconstruct
   the residual ``e = x − x_hat`` (detached): ``r = Σ_i w_i ReLU(pre_i) W_dec[i]``;
4. ``aux_zipf_loss = mean ||e − r||² / mean ||e − mean(e)||²`` (OpenAI's normalisation, as our AuxK).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..saes.base import SAE, SparseLatents, sparse_decode
from ..saes.choice import (
    FeatureChoiceSAE, coo_decode, coo_encode, feature_choice_select, mutual_choice_select, uniform_capacities,
    zipf_capacities,
)
from ..saes.kernels import gather_encode
from .losses import LossOutput, _auxk, _encoder_input, _mse, _skip


def signed_topk_loss(sae: SAE, x: Tensor, mse_scale: float, target: Tensor | None = None) -> LossOutput:
    y = x if target is None else target
    x_in = _encoder_input(sae, x)
    b_enc = sae.b_enc if sae.has_encoder_bias else None
    with torch.no_grad():
        pre = x_in @ sae.W_enc
        if b_enc is not None:
            pre = pre + b_enc
        idx = pre.abs().topk(int(sae.cfg.k), dim=-1, sorted=False).indices
        values = pre.gather(-1, idx)
    acts = gather_encode(x_in, sae.W_enc, b_enc, idx, values)
    x_hat = sparse_decode(SparseLatents(acts, idx, sae.cfg.d_sae), sae.W_dec) + sae.b_dec + _skip(sae, x)
    mse = _mse(y, x_hat)
    with torch.no_grad():
        nz = acts != 0
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
        fired[idx[nz]] = True
        l0 = nz.sum(-1).float().mean()
    return LossOutput(mse_scale * mse, mse.detach(), torch.zeros((), device=x.device), fired, l0)


# aux_zipf_loss ------------------------------------------------------------------------------------


@torch.no_grad()
def zipf_expected_density(density: Tensor, alpha: float | None = None) -> Tensor:
    """The Zipf curve ``e_i = exp(c) · r_i^-α`` fitted to ``density (F,)`` (see the module docstring).

    Zeros when fewer than two features (one with a fixed ``alpha``) of the upper half have ``d > 0``."""
    f = density.shape[0]
    d = density.double()
    order = torch.sort(d, descending=True, stable=True).indices
    ranks = torch.empty(f, dtype=torch.float64, device=d.device)
    ranks[order] = torch.arange(1, f + 1, dtype=torch.float64, device=d.device)
    fit = (ranks <= max(1, f // 2)) & (d > 0)
    need = 1 if alpha is not None else 2
    if int(fit.sum()) < need:
        return torch.zeros_like(d)
    lr, ld = ranks[fit].log(), d[fit].log()
    if alpha is None:
        lr_c = lr - lr.mean()
        denom = (lr_c * lr_c).sum()
        slope = (lr_c * (ld - ld.mean())).sum() / denom if float(denom) > 0 else torch.zeros((), dtype=d.dtype)
        a = -slope
    else:
        a = torch.tensor(float(alpha), dtype=d.dtype, device=d.device)
    c = (ld + a * lr).mean()
    return torch.exp(c - a * ranks.log())


@torch.no_grad()
def zipf_weights(density: Tensor, alpha: float | None = None) -> Tensor:
    """Under-use weights ``w_i = clamp(1 − d_i/e_i, 0, 1)``; without a fitted curve, 1 for dead features only."""
    expected = zipf_expected_density(density, alpha)
    d = density.double()
    w = torch.where(expected > 0, (1 - d / expected.clamp_min(1e-300)).clamp(0, 1), (d <= 0).double())
    return w.to(density.dtype)


def aux_zipf_loss(
    sae: SAE, x_in: Tensor, pre: Tensor, residual: Tensor, weights: Tensor, aux_k: int,
    aux_denom: Callable[[Tensor], Tensor] | None = None,
) -> Tensor | None:
    """The auxiliary loss of the module docstring; ``None`` when no feature is under-used.

    ``x_in (N, d_in)`` encoder input, ``pre (N, F)`` its (no-grad) pre-activations, ``residual (N, d)``
    detached, ``weights (F,)`` from :func:`zipf_weights`."""
    candidates = weights > 0
    k_aux = min(aux_k, int(candidates.sum()))
    if k_aux == 0:
        return None
    with torch.no_grad():
        score = (torch.relu(pre) * weights).masked_fill(~candidates, float("-inf"))
        idx = score.topk(k_aux, dim=-1, sorted=False).indices
        values = pre.gather(-1, idx)
    b_enc = sae.b_enc if sae.has_encoder_bias else None
    acts = torch.relu(gather_encode(x_in, sae.W_enc, b_enc, idx, values)) * weights[idx]
    recon = sparse_decode(SparseLatents(acts, idx, sae.cfg.d_sae), sae.W_dec)
    denom = aux_denom(residual) if aux_denom is not None else (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return (recon - residual).pow(2).sum(-1).mean() / denom.clamp_min(1e-12)


# Feature / Mutual Choice -------------------------------------------------------------------------


def choice_loss(
    sae: SAE, x: Tensor, mse_scale: float, dead: Tensor, aux_k: int, aux_coefficient: float, threshold_lr: float,
    first_step: bool, *, aux: str = "zipf", zipf_alpha: float | None = None, capacities: str = "uniform",
    density_lr: float = 0.01, aux_denom: Callable[[Tensor], Tensor] | None = None, target: Tensor | None = None,
) -> LossOutput:
    """Feature Choice / Mutual Choice training loss (see the module docstring).

    ``capacities`` (Feature Choice): ``"uniform"`` (``round(k·N/F)``) or ``"zipf"`` (:func:`zipf_capacities`
    with total ``k·N`` and exponent ``zipf_alpha`` or 1.0, by rank of ``feature_density``)."""
    y = x if target is None else target
    x_in = _encoder_input(sae, x)
    b_enc = sae.b_enc if sae.has_encoder_bias else None
    n, f = x.shape[0], sae.cfg.d_sae
    k = int(sae.cfg.k)  # type: ignore[arg-type]
    with torch.no_grad():
        pre = x_in @ sae.W_enc
        if b_enc is not None:
            pre = pre + b_enc
        if isinstance(sae, FeatureChoiceSAE):
            if capacities == "zipf" and not first_step:
                caps = zipf_capacities(sae.feature_density, k * n, zipf_alpha if zipf_alpha is not None else 1.0)
            else:
                caps = uniform_capacities(f, k, n, x.device)
            rows, cols, values = feature_choice_select(pre, caps)
        else:
            rows, cols, values = mutual_choice_select(pre, k)
        weights = zipf_weights(sae.feature_density, zipf_alpha) if aux == "zipf" and not first_step else None
    acts = torch.relu(coo_encode(x_in, sae.W_enc, b_enc, rows, cols, values))
    x_hat = coo_decode(acts, sae.W_dec, rows, cols, n) + sae.b_dec + _skip(sae, x)
    mse = _mse(y, x_hat)
    loss = mse_scale * mse
    aux_term = torch.zeros((), device=x.device)
    if aux_coefficient:
        residual = (y - x_hat).detach()
        if aux == "zipf":
            a = aux_zipf_loss(sae, x_in, pre, residual, weights, aux_k, aux_denom) if weights is not None else None
        else:
            a = _auxk(sae, x_in, pre, residual, dead, aux_k, aux_denom)
        if a is not None:
            aux_term = aux_coefficient * a
            loss = loss + aux_term
    with torch.no_grad():
        fired = torch.zeros(f, dtype=torch.bool, device=x.device)
        fired[cols] = True
        counts = torch.bincount(cols, minlength=f).to(sae.feature_density.dtype) / n
        if first_step:
            sae.feature_density.copy_(counts)
        else:
            sae.feature_density.add_(density_lr * (counts - sae.feature_density))
        if values.numel():
            if isinstance(sae, FeatureChoiceSAE):
                low = torch.full((f,), float("inf"), dtype=values.dtype, device=x.device)
                low = low.scatter_reduce(0, cols, values, reduce="amin")
                hit = torch.isfinite(low)
                new = sae.threshold.clone()
                new[hit] = low[hit] if first_step else new[hit] + threshold_lr * (low[hit] - new[hit])
                sae.threshold.copy_(new)
            else:
                low = values.min().to(sae.threshold.dtype)
                sae.threshold.copy_(low if first_step else sae.threshold + threshold_lr * (low - sae.threshold))
        l0 = torch.tensor(rows.numel() / n, device=x.device)
    return LossOutput(loss, mse.detach(), aux_term.detach(), fired, l0)


# Matryoshka ---------------------------------------------------------------------------------------


def matryoshka_loss(
    sae: SAE, x: Tensor, mse_scale: float, dead: Tensor, aux_k: int, aux_coefficient: float, threshold_lr: float,
    first_step: bool, *, prefix_weights: list[float] | None = None,
    aux_denom: Callable[[Tensor], Tensor] | None = None, target: Tensor | None = None,
) -> LossOutput:
    """``mse_scale · Σ_g w_g · mean ||y − x_hat_g||²`` over the nested prefixes, plus AuxK on the full residual."""
    y = x if target is None else target
    x_in = _encoder_input(sae, x)
    widths = sae.widths  # type: ignore[attr-defined]
    weights = prefix_weights if prefix_weights is not None else [1.0 / len(widths)] * len(widths)
    pre = sae.pre_acts(x)
    f = sae.batch_topk(pre)  # type: ignore[attr-defined]
    x_hat = sae.b_dec + _skip(sae, x)
    total = 0.0
    start = 0
    for w_g, m in zip(weights, widths):
        x_hat = x_hat + f[:, start:m] @ sae.W_dec[start:m]
        total = total + w_g * _mse(y, x_hat)
        start = m
    mse = _mse(y, x_hat)
    loss = mse_scale * total
    aux = torch.zeros((), device=x.device)
    auxk = _auxk(sae, x_in, pre.detach(), (y - x_hat).detach(), dead, aux_k, aux_denom) if aux_coefficient else None
    if auxk is not None:
        aux = aux_coefficient * auxk
        loss = loss + aux
    with torch.no_grad():
        kept = f[f > 0]
        if kept.numel():
            low = kept.min().to(sae.threshold.dtype)
            sae.threshold.copy_(low if first_step else sae.threshold + threshold_lr * (low - sae.threshold))
        active = f != 0
    return LossOutput(loss, mse.detach(), aux.detach(), active.any(0), active.sum(-1).float().mean())


@torch.no_grad()
def prefix_fvu(sae: SAE, x: Tensor) -> dict[int, float]:
    """FVU of each nested prefix of a Matryoshka SAE with its inference encoder (``x (N, d_in)``, model space):
    ``Σ ||x − x_hat_m||² / Σ ||x − mean x||²``."""
    latents, state = sae.encode_with_state(x)
    dense = latents if isinstance(latents, Tensor) else latents.to_dense()
    var = (x - x.mean(0)).pow(2).sum()
    return {m: float((x - sae.decode_prefix(dense, m, state)).pow(2).sum() / var) for m in sae.widths}  # type: ignore[attr-defined]
