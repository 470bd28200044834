"""Training losses, one per architecture. Inputs are already in the SAE's normalised coordinates.

Conventions (``x`` is ``(N, d_in)``, ``x_hat`` the reconstruction, ``||·||`` the L2 norm over ``d``):

* ``relu``: ``mean ||x − x_hat||² + λ₁ · mean Σ_i f_i ||W_dec[i]||`` (L1 weighted by decoder norms,
  SAELens "standard"/Anthropic; decoder not constrained).
* ``topk``: OpenAI's convention (Gao et al. 2024): ``mse_scale · mean ||x − x_hat||²`` with
  ``mse_scale = 1 / mean ||x − mean x||²`` fixed once on the first batch (≈ FVU), plus AuxK:
  ``aux_coefficient · NMSE(decode(top-aux_k of the dead latents' pre-activations), e)``, ``e = x −
  x_hat`` detached, ``NMSE(r, e) = mean ||r − e||² / mean ||e − mean e||²``, no decoder bias in the
  auxiliary reconstruction, ``aux_k = min(256, n_dead)`` by default, coefficient 1/32. Dead latents are
  masked with −inf before the top-k (SAELens) so a live latent is never picked. The forward uses
  sparse latents: a blocked selection (:func:`~sae_hooks.saes.kernels.topk_select`, one ``(rows,
  d_sae)`` no-grad block at a time), a gather with a sparse backward (``GatherEncode``) and a decode
  with a sparse backward (``SparseDecode``): no dense ``(N, d_sae)`` tensor and no dense gradient.
* ``batchtopk``: the same losses with the batch-level top ``k·N`` (Bussmann et al. 2024); dense by
  nature. The inference threshold is an exponential moving average of the smallest activation the
  batch top-k kept: ``θ ← θ + threshold_lr · (min_kept − θ)`` (first batch: ``θ = min_kept``), as in
  Bussmann et al. / SAELens (``topk_threshold_lr = 0.01``).
* ``jumprelu``: ``mean ||x − x_hat||² + λ₀ · mean Σ_i H(π_i − θ_i)`` with the straight-through
  pseudo-derivatives of :mod:`.autograd` (rectangle kernel, ``bandwidth`` ε).
* ``gated``: ``mean ||x − x_hat||² + λ₁ · mean Σ_i ReLU(π_gate,i) ||W_dec[i]|| + mean ||x −
  (ReLU(π_gate) W_decᵀ_detached + b_dec_detached)||²`` (Rajamanoharan et al. 2024, auxiliary loss
  through frozen decoder copies).

MSE is a sum over ``d`` and a mean over tokens (except ``topk``/``batchtopk``, which are normalised).

Transcoders: every loss takes an optional ``target`` ``(N, d_out)``; the reconstruction ``x_hat`` is
then the transcoder's prediction of ``target`` from ``x`` (plus ``x @ W_skip`` for skip transcoders,
whose ``W_skip`` is trained by the same MSE; Gated's auxiliary path adds it frozen), and every
``||x − ·||`` above reads ``||target − ·||``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..saes.base import SAE, SparseLatents, sparse_decode
from ..saes.kernels import gather_encode, jumprelu, step, topk_select


@dataclass
class LossOutput:
    loss: Tensor
    mse: Tensor  # mean over tokens of ||x - x_hat||^2 (normalised coordinates), detached
    aux: Tensor  # the sparsity / auxiliary part, detached
    fired: Tensor  # (d_sae,) bool: latents nonzero anywhere in the batch
    l0: Tensor  # mean number of nonzero latents per token


def _encoder_input(sae: SAE, x: Tensor) -> Tensor:
    return x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x


def _skip(sae: SAE, x: Tensor, detach: bool = False) -> Tensor | float:
    """``x @ W_skip`` for skip transcoders, else 0."""
    if not sae.cfg.skip:
        return 0.0
    return x @ (sae.W_skip.detach() if detach else sae.W_skip)


def _mse(x: Tensor, x_hat: Tensor) -> Tensor:
    return (x_hat - x).pow(2).sum(-1).mean()


def _decoder_norms(sae: SAE) -> Tensor:
    return sae.W_dec.norm(dim=-1)


def _dense_out(x: Tensor, x_hat: Tensor, f: Tensor, loss: Tensor, aux: Tensor) -> LossOutput:
    active = f != 0
    return LossOutput(loss, _mse(x, x_hat).detach(), aux.detach(), active.any(0), active.sum(-1).float().mean())


def relu_loss(sae: SAE, x: Tensor, l1_coefficient: float, target: Tensor | None = None) -> LossOutput:
    y = x if target is None else target
    f = torch.relu(sae.pre_acts(x))
    x_hat = f @ sae.W_dec + sae.b_dec + _skip(sae, x)
    sparsity = (f * _decoder_norms(sae)).sum(-1).mean()
    aux = l1_coefficient * sparsity
    return _dense_out(y, x_hat, f, _mse(y, x_hat) + aux, aux)


def jumprelu_loss(
    sae: SAE, x: Tensor, l0_coefficient: float, bandwidth: float, target: Tensor | None = None,
) -> LossOutput:
    y = x if target is None else target
    pre = sae.pre_acts(x)
    f = jumprelu(pre, sae.threshold, bandwidth)
    x_hat = f @ sae.W_dec + sae.b_dec + _skip(sae, x)
    l0 = step(pre, sae.threshold, bandwidth).sum(-1).mean()
    aux = l0_coefficient * l0
    return _dense_out(y, x_hat, f, _mse(y, x_hat) + aux, aux)


def gated_loss(sae: SAE, x: Tensor, l1_coefficient: float, target: Tensor | None = None) -> LossOutput:
    y = x if target is None else target
    x_in = _encoder_input(sae, x)
    hidden = x_in @ sae.W_enc
    pi_gate = hidden + sae.b_gate
    gate = (pi_gate > 0).to(hidden.dtype)
    magnitude = torch.relu(hidden * torch.exp(sae.r_mag) + sae.b_mag)
    f = gate * magnitude
    x_hat = f @ sae.W_dec + sae.b_dec + _skip(sae, x)
    gate_act = torch.relu(pi_gate)
    sparsity = l1_coefficient * (gate_act * _decoder_norms(sae)).sum(-1).mean()
    aux_recon = gate_act @ sae.W_dec.detach() + sae.b_dec.detach() + _skip(sae, x, detach=True)
    aux = sparsity + _mse(y, aux_recon)
    return _dense_out(y, x_hat, f, _mse(y, x_hat) + aux, aux)


def _auxk(
    sae: SAE, x_in: Tensor, pre: Tensor | None, residual: Tensor, dead: Tensor, aux_k: int,
    aux_denom: Callable[[Tensor], Tensor] | None = None, selected: tuple[Tensor | None, Tensor | None] | None = None,
) -> Tensor | None:
    """OpenAI's AuxK term (normalised MSE of the dead latents' reconstruction of the residual).

    ``aux_denom(residual)`` replaces the batch's ``mean ||e − mean e||²`` (data-parallel training passes
    the value over every rank's rows, so the loss is the one of the whole batch)."""
    if selected is not None:  # chosen by topk_select alongside the main top-k
        values, idx = selected
        if values is None:
            return None
    else:
        n_dead = int(dead.sum())
        k_aux = min(aux_k, n_dead)
        if k_aux == 0:
            return None
        with torch.no_grad():
            masked = pre.masked_fill(~dead, float("-inf"))
            values, idx = masked.topk(k_aux, dim=-1, sorted=False)
    b_enc = sae.b_enc if sae.has_encoder_bias else None
    acts = torch.relu(gather_encode(x_in, sae.W_enc, b_enc, idx, values))
    recon = sparse_decode(SparseLatents(acts, idx, sae.cfg.d_sae), sae.W_dec)
    denom = aux_denom(residual) if aux_denom is not None else (residual - residual.mean(0)).pow(2).sum(-1).mean()
    denom = denom.clamp_min(1e-12)
    return (recon - residual).pow(2).sum(-1).mean() / denom


def topk_loss(
    sae: SAE, x: Tensor, mse_scale: float, dead: Tensor, aux_k: int, aux_coefficient: float,
    aux_denom: Callable[[Tensor], Tensor] | None = None, target: Tensor | None = None,
) -> LossOutput:
    y = x if target is None else target
    x_in = _encoder_input(sae, x)
    b_enc = sae.b_enc if sae.has_encoder_bias else None
    # Blocked selection (one (rows, d_sae) pre-activation block at a time) of the top k and of the
    # AuxK candidates; every gradient below is sparse (saes/kernels.py).
    sel = topk_select(x_in.detach(), sae.W_enc, b_enc, int(sae.cfg.k), dead=dead if aux_coefficient else None, aux_k=aux_k)
    idx = sel.indices
    acts = torch.relu(gather_encode(x_in, sae.W_enc, b_enc, idx, sel.values))
    x_hat = sparse_decode(SparseLatents(acts, idx, sae.cfg.d_sae), sae.W_dec) + sae.b_dec + _skip(sae, x)
    mse = _mse(y, x_hat)
    loss = mse_scale * mse
    aux = torch.zeros((), device=x.device)
    auxk = (
        _auxk(sae, x_in, None, (y - x_hat).detach(), dead, aux_k, aux_denom, selected=(sel.aux_values, sel.aux_indices))
        if aux_coefficient else None
    )
    if auxk is not None:
        aux = aux_coefficient * auxk
        loss = loss + aux
    with torch.no_grad():
        nz = acts > 0
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
        fired[idx[nz]] = True
        l0 = nz.sum(-1).float().mean()
    return LossOutput(loss, mse.detach(), aux.detach(), fired, l0)


def batchtopk_loss(
    sae: SAE, x: Tensor, mse_scale: float, dead: Tensor, aux_k: int, aux_coefficient: float, threshold_lr: float,
    first_step: bool, aux_denom: Callable[[Tensor], Tensor] | None = None, target: Tensor | None = None,
) -> LossOutput:
    y = x if target is None else target
    x_in = _encoder_input(sae, x)
    pre = sae.pre_acts(x)
    f = sae.batch_topk(pre)
    x_hat = f @ sae.W_dec + sae.b_dec + _skip(sae, x)
    mse = _mse(y, x_hat)
    loss = mse_scale * mse
    aux = torch.zeros((), device=x.device)
    auxk = _auxk(sae, x_in, pre.detach(), (y - x_hat).detach(), dead, aux_k, aux_denom) if aux_coefficient else None
    if auxk is not None:
        aux = aux_coefficient * auxk
        loss = loss + aux
    with torch.no_grad():
        kept = f[f > 0]
        if kept.numel():
            low = kept.min().to(sae.threshold.dtype)
            if first_step:
                sae.threshold.copy_(low)
            else:
                sae.threshold.add_(threshold_lr * (low - sae.threshold))
    out = _dense_out(y, x_hat, f, loss, aux)
    out.mse = mse.detach()
    return out
