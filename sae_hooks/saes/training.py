"""What every architecture's training spec is made of (the trainer in :mod:`sae_hooks.train` drives it).

An architecture module holds its SAE class *and* a :class:`TrainingSpec`: the loss (computed with the
SAE's own encoder, :meth:`~.base.SAE.encode_normalized` with ``training=True``), the weight
initialisation, the hook run after each optimiser step (threshold clamp, EMA update) and its settings
dataclass (:class:`ArchSettings`, strict keys). Both are registered together
(:func:`~.registry.register_sae_class`), so making a new architecture trainable is one module.

Shared conventions (``x`` is ``(N, d_in)`` in the SAE's normalised coordinates, ``y`` the
reconstruction target, ``x`` itself for an autoencoder, ``y_hat`` the reconstruction, ``||·||`` the L2
norm over the feature dimension):

* MSE is a sum over features and a mean over tokens: ``mean ||y − y_hat||²``.
* AuxK (Gao et al. 2024) is written once, :func:`dead_reconstruction`: the top-``aux_k`` pre-activations
  among the dead latents (dead masked with −inf first, as SAELens, so a live latent is never picked),
  encoded with the sparse-backward gather and decoded without ``b_dec``. Each objective normalises it
  its own documented way (OpenAI's NMSE for TopK/BatchTopK: :func:`auxk_nmse`).
* The decoder-norm constraint (:func:`remove_parallel_grad`, :func:`unit_norm_rows_`) is applied by the
  trainer to the parameters a spec lists (``W_dec``) when the spec asks for unit-norm decoders.

This module imports nothing above :mod:`sae_hooks.saes` (no ``train/``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, did_you_mean
from .base import SAE, SparseLatents, sparse_decode
from .kernels import gather_encode, normalize_rows_, remove_parallel_component_, topk_select


# Settings -----------------------------------------------------------------------------------------


@dataclass
class ArchSettings:
    """Base of every architecture's settings dataclass; :meth:`from_dict` rejects unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | ArchSettings | None) -> ArchSettings:
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        if isinstance(data, ArchSettings):
            data = data.to_dict()
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: settings must be a dict, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = "".join(did_you_mean(str(k), known, 1) for k in unknown)
            raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}.{hints} Known keys: {known}")
        try:
            return cls(**data)
        except TypeError as e:  # pragma: no cover - defensive: keys were checked
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{type(self).__name__}.{f.name} must be finite, got {v!r}")


@dataclass
class NoSettings(ArchSettings):
    """An architecture without settings of its own."""


@dataclass
class AuxKSettings(ArchSettings):
    """AuxK for TopK-style SAEs: ``aux_k`` dead latents, weight ``aux_coefficient`` (0 disables it)."""

    aux_k: int = 256
    aux_coefficient: float = 1 / 32


# What the trainer passes in and gets back ----------------------------------------------------------


@dataclass
class StepContext:
    """What a loss needs from the trainer at one step.

    Attributes:
        step: optimiser steps taken so far (0 on the first).
        total_steps: length of the run, when known.
        dead: ``(n_latents,)`` bool, latents that have not fired for ``dead_tokens`` tokens.
        sparsity: the sparsity coefficient's warm-up factor in ``[0, 1]``.
        mse_scale: ``1 / variance`` of the target, fixed from the first batches (TopK's normalised MSE).
        aux_denom: ``mean ||e − mean e||²`` over every rank's rows (data-parallel); ``None`` = this batch's.
    """

    step: int = 0
    total_steps: int | None = None
    dead: Tensor | None = None
    sparsity: float = 1.0
    mse_scale: float = 1.0
    aux_denom: Callable[[Tensor], Tensor] | None = None


@dataclass
class LossOutput:
    """A loss and what the trainer records from it. ``metrics`` are detached scalars."""

    loss: Tensor
    fired: Tensor  # (n_latents,) bool: latents active anywhere in the batch
    metrics: dict[str, Tensor] = field(default_factory=dict)
    #: values for :meth:`TrainingSpec.after_step` (applied only when the step is taken).
    updates: dict[str, Tensor] = field(default_factory=dict)


class TrainingSpec:
    """How an architecture trains; subclass per architecture and register with its SAE class.

    Class attributes: ``settings`` (the :class:`ArchSettings` subclass), ``unit_norm_decoder`` (keep
    decoder rows at unit norm, gradient parallel to them removed), ``synced_buffers`` (buffers averaged
    across data-parallel ranks after each step).
    """

    settings: ClassVar[type[ArchSettings]] = NoSettings
    unit_norm_decoder: ClassVar[bool] = True
    synced_buffers: ClassVar[tuple[str, ...]] = ()
    #: initial encoder norm relative to the decoder's (``None``: tied at the decoder's norm).
    encoder_init_norm: ClassVar[float | None] = None

    @torch.no_grad()
    def init(self, sae: SAE, settings: ArchSettings) -> None:
        """Architecture-specific initialisation after the common one (e.g. JumpReLU's threshold)."""

    def loss(self, sae: SAE, x: Tensor, target: Tensor | None, settings: ArchSettings, ctx: StepContext) -> LossOutput:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, sae: SAE, settings: ArchSettings, out: LossOutput, first: bool) -> None:
        """Run after the optimiser step was taken (never for a skipped batch)."""


# Shared pieces -------------------------------------------------------------------------------------


def mse(y: Tensor, y_hat: Tensor) -> Tensor:
    """``mean_tokens ||y − y_hat||²``."""
    return (y_hat - y).pow(2).sum(-1).mean()


def skip_term(sae: SAE, x: Tensor, detach: bool = False) -> Tensor | float:
    """``x @ W_skip`` for skip transcoders, else 0."""
    if not sae.cfg.skip:
        return 0.0
    return x @ (sae.W_skip.detach() if detach else sae.W_skip)


def encoder_input(sae: SAE, x: Tensor) -> Tensor:
    """What multiplies ``W_enc``: ``x − b_dec`` when ``apply_b_dec_to_input``."""
    return x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x


def fired_and_l0(latents: Tensor | SparseLatents, d_sae: int, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(fired (d_sae,) bool, mean active latents per token)``; active means ``> eps`` (``!= 0`` at 0)."""
    with torch.no_grad():
        if isinstance(latents, SparseLatents):
            active = latents.values > eps if eps else latents.values != 0
            fired = torch.zeros(d_sae, dtype=torch.bool, device=active.device)
            fired[latents.indices[active]] = True
            if latents.crow is not None:  # ragged: mean over tokens
                return fired, active.sum().float() / max(1, latents.crow.numel() - 1)
            return fired, active.sum(-1).float().mean()
        active = latents > eps if eps else latents != 0
        return active.reshape(-1, d_sae).any(0), active.sum(-1).float().mean()


def dead_reconstruction(sae: SAE, x_in: Tensor, pre: Tensor | None, dead: Tensor | None, aux_k: int) -> Tensor | None:
    """AuxK's reconstruction from the dead latents: ``decode(ReLU(top-aux_k of the dead latents'
    pre-activations))`` without ``b_dec``, ``(N, d_out)``; ``None`` when no latent is dead.

    ``x_in (N, d_in)`` is the encoder input, ``pre (N, d_sae)`` the (detached) pre-activations, or
    ``None`` when the encoder did not keep them (TopK's blocked training encoder): the dead latents'
    pre-activations are then computed for those columns only, block by block
    (:func:`~.kernels.topk_select`), at ``n_dead / d_sae`` of the encoder's cost."""
    if dead is None:
        return None
    k_aux = min(aux_k, int(dead.sum()))
    if k_aux == 0:
        return None
    b_enc = sae.b_enc if sae.has_encoder_bias else None
    if pre is None:
        cols = dead.nonzero().squeeze(1)
        sel = topk_select(x_in.detach(), sae.W_enc.T[cols].T, None if b_enc is None else b_enc[cols], k_aux)
        values, idx = sel.values, cols[sel.indices]
    else:
        with torch.no_grad():
            values, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
    acts = torch.relu(gather_encode(x_in, sae.W_enc, b_enc, idx, values))
    return sparse_decode(SparseLatents(acts, idx, sae.cfg.d_sae), sae.W_dec)


def auxk_nmse(recon: Tensor, residual: Tensor, aux_denom: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """OpenAI's AuxK normalisation: ``mean ||r − e||² / mean ||e − mean e||²`` (``e`` detached residual)."""
    denom = aux_denom(residual) if aux_denom is not None else (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return (recon - residual).pow(2).sum(-1).mean() / denom.clamp_min(1e-12)


def remove_parallel_grad(W: Tensor) -> None:
    """Remove from ``W.grad`` its component parallel to each row of ``W`` (in place)."""
    if W.grad is not None:
        remove_parallel_component_(W.grad, W.detach())  # no full-size temporary


@torch.no_grad()
def unit_norm_rows_(W: Tensor) -> None:
    """Rescale every row of ``W`` to unit norm (in place)."""
    normalize_rows_(W)


def reconstruction_loss(
    sae: SAE, x: Tensor, target: Tensor | None, latents: Tensor | SparseLatents, sparsity: Tensor | float,
    *, scale: float = 1.0, extra: Tensor | float = 0.0, eps: float = 0.0,
) -> tuple[LossOutput, Tensor]:
    """``scale · MSE(target, decode(latents) + skip) + sparsity + extra``; returns the output and ``y_hat``."""
    y = x if target is None else target
    y_hat = sae.decode(latents) + skip_term(sae, x)
    err = mse(y, y_hat)
    loss = scale * err + sparsity + extra
    fired, l0 = fired_and_l0(latents, sae.cfg.d_sae, eps)
    aux = torch.as_tensor(sparsity + extra, dtype=err.dtype, device=err.device).detach()
    return LossOutput(loss, fired, {"mse": err.detach(), "aux": aux, "l0": l0}), y_hat
