"""Multi-layer residual SAE (MLSAE; Lawson, Farnik, Houghton, Aitchison, ICLR 2025).

One TopK SAE whose examples are the residual stream after *every* block
(``blocks.{i}.hook_resid_post`` for all ``i``), with the same weights at every layer. Per input vector
``x`` (one token at one layer):

1. standardise: ``x' = (x - mean_d x) / (std_d(x - mean) + 1e-5)`` (unbiased std; ``normalize="standardize"``);
2. ``pre = (x' - b_dec) @ W_enc`` -- ``b_dec`` is MLSAE's ``pre_encoder_bias`` (``apply_b_dec_to_input=True``);
   there is **no encoder bias**: the class has no ``b_enc`` at all (``has_encoder_bias = False``),
   so checkpoints carry no dead zero tensor and optimisers cannot move one;
3. ``f = ReLU(TopK_k(pre))`` (sparse values + indices);
4. ``x_hat = (f @ W_dec + b_dec) * std + mean``.

Special tokens: MLSAE sets the residuals of special tokens (BOS/EOS/PAD) to **zero at every layer**
before the SAE, for training and evaluation data -- see :func:`zero_special_tokens`, used by
:mod:`sae_hooks.train.mlsae` and :mod:`sae_hooks.eval.multilayer`. When a user attaches an MLSAE to a
model, ``skip_tokens=[...]`` instead *bypasses* those positions (the SAE leaves them untouched and
records zero latents), which is the SAELens-style behaviour of every other SAE here.

Training (:class:`MultiLayerTraining`, MLSAE's ``MSELoss`` + ``AuxiliaryLoss``), with ``x_l`` the raw
residuals of layer ``l`` in the batch and ``x_hat`` the de-standardised reconstruction::

    loss = mean_l( mean((x_hat_l - x_l)^2) / var(x_l) ) + aux_coefficient * AuxK

``var`` is the unbiased scalar variance of all of the layer's entries in the batch. AuxK (Gao et al.):
``e = x - x_hat`` (detached, raw space); ``r`` = :func:`~.training.dead_reconstruction` mapped to raw
space by the per-vector scale (no bias); ``AuxK = mean((e - r)^2) / mean((e - mean_d e)^2)``. Deviation
from the MLSAE code, on purpose: its ``r`` stays in standardised space and carries ``+ b_pre`` (a quirk
methods §1.2 flags). A latent fires when it is in a TopK set with value > 1e-3. Unit-norm decoder rows
(gradient parallel to them removed). ``b_dec`` starts at the geometric median of the first batch's
*standardised* inputs, pooled over layers -- the space where it is used (MLSAE's code uses the raw
inputs, a quirk we do not copy); the trainer's objective does that (:mod:`sae_hooks.train.objectives`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import SAEConfig, Site
from ..errors import ConfigError, ShapeMismatchError
from .base import SparseLatents
from .registry import register_sae_class
from .topk import TopKSAE
from .training import AuxKSettings, LossOutput, StepContext, TrainingSpec, dead_reconstruction

RESID_POST = "blocks.{}.hook_resid_post"


def mlsae_sites(n_layers: int | Sequence[int]) -> list[Site]:
    """``[Site("blocks.0.hook_resid_post"), ...]`` for ``range(n_layers)`` or the given layer indices."""
    layers = range(n_layers) if isinstance(n_layers, int) else n_layers
    return [Site(hook=RESID_POST.format(i)) for i in layers]


class MultiLayerSAE(TopKSAE):
    """A TopK SAE shared by all layers' residual streams; no encoder bias; per-vector standardisation.

    Shapes: ``encode(x)``: ``(..., d_in) -> (..., d_sae)``; :meth:`encode_layers` takes the stacked
    residuals ``(n_layers, ..., d_in)`` of one forward pass and returns sparse latents
    ``(n_layers, ..., k)`` (every layer is an independent example, exactly as :meth:`encode`).
    """

    architecture = "mlsae"
    has_encoder_bias = False

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.d_out is not None and cfg.d_out != cfg.d_in:
            raise ConfigError(f"an MLSAE reconstructs its input: d_out must be None or d_in={cfg.d_in}, got {cfg.d_out}")
        if cfg.skip:
            raise ConfigError("an MLSAE has no skip path (skip=True is for skip transcoders)")
        super().__init__(cfg)

    @property
    def layers(self) -> list[int]:
        """Layer indices of the configured ``blocks.{i}.hook_resid_post`` sites (in order)."""
        out = []
        for site in self.cfg.sites:
            parts = (site.hook or "").split(".")
            if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
                out.append(int(parts[1]))
        return out

    def encode_layers(self, x: Tensor) -> tuple[SparseLatents, Any]:
        """Sparse latents and norm state for stacked residuals ``(n_layers, ..., d_in)``."""
        if x.dim() < 2:
            raise ShapeMismatchError(f"encode_layers expects (n_layers, ..., d_in={self.cfg.d_in}), got {tuple(x.shape)}")
        return self.encode_with_state(x)  # type: ignore[return-value]


class MultiLayerTraining(TrainingSpec):
    """MLSAE's loss on stacked raw residuals ``x (n_layers, N, d_in)`` (special tokens already zeroed)."""

    settings = AuxKSettings
    fired_above = 1e-3

    def loss(self, sae: MultiLayerSAE, x: Tensor, target: Tensor | None, settings: AuxKSettings, ctx: StepContext) -> LossOutput:
        if x.dim() != 3 or x.shape[-1] != sae.cfg.d_in:
            raise ShapeMismatchError(f"MLSAE training batches are (n_layers, N, d_in={sae.cfg.d_in}), got {tuple(x.shape)}")
        x = x.to(sae.dtype)
        L, N, d = x.shape
        xs, state = sae.normalize_input(x.reshape(L * N, d))
        lat, pre = sae.encode_normalized(xs, training=True)
        x_hat = sae.decode(lat, state).reshape(L, N, d)
        fvu_l = (x_hat - x).pow(2).mean((1, 2)) / x.reshape(L, -1).var(-1).clamp_min(1e-12)
        loss = fvu_l.mean()
        with torch.no_grad():
            active = lat.values > self.fired_above
            fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
            fired[lat.indices[active]] = True
        aux = torch.zeros((), device=x.device)
        r = dead_reconstruction(sae, xs - sae.b_dec, pre, ctx.dead, settings.aux_k) if settings.aux_coefficient else None
        if r is not None:
            e = (x - x_hat).reshape(L * N, d).detach()
            r = r * state.scale
            aux = (e - r).pow(2).mean() / (e - e.mean(-1, keepdim=True)).pow(2).mean().clamp_min(1e-12)
            loss = loss + settings.aux_coefficient * aux
        metrics = {"fvu": fvu_l.mean().detach(), "aux": aux.detach(), "l0": active.sum(-1).float().mean(),
                   **{f"fvu_layer{i}": v.detach() for i, v in enumerate(fvu_l)}}
        return LossOutput(loss, fired, metrics)


register_sae_class(MultiLayerSAE, spec=MultiLayerTraining())


def make_mlsae(
    d_model: int,
    n_layers: int | Sequence[int],
    *,
    d_sae: int | None = None,
    expansion_factor: int = 8,
    k: int = 32,
    model_name: str | None = None,
    dtype: str = "float32",
    seed: int | None = None,
) -> MultiLayerSAE:
    """An MLSAE for a model with ``d_model`` residual width, reading ``blocks.{i}.hook_resid_post``.

    ``d_sae`` defaults to ``expansion_factor * d_model`` (MLSAE's ``n_latents``). Initialised as MLSAE
    does: tied (``W_enc = W_dec^T``), unit-norm decoder rows, ``b_dec`` zero.
    """
    cfg = SAEConfig(
        architecture="mlsae",
        d_in=d_model,
        d_sae=d_sae or expansion_factor * d_model,
        k=k,
        dtype=dtype,
        apply_b_dec_to_input=True,
        normalize="standardize",
        norm_eps=1e-5,
        sites=mlsae_sites(n_layers),
        model_name=model_name,
    )
    sae = MultiLayerSAE(cfg)
    if seed is not None:
        sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def zero_special_tokens(resid: Tensor, tokens: Tensor, special_ids: Sequence[int]) -> Tensor:
    """MLSAE's ``skip_special_tokens``: residuals ``(..., batch, seq, d)`` with special tokens set to 0.

    ``tokens`` is ``(batch, seq)``; leading dims of ``resid`` (e.g. layers) broadcast. A zero vector
    standardises to zero, so it reconstructs to (almost exactly) zero and adds no error, but it still
    counts in per-layer means and variances -- as in the paper.
    """
    if not special_ids:
        return resid
    if tuple(resid.shape[-3:-1]) != tuple(tokens.shape):
        raise ShapeMismatchError(
            f"residuals {tuple(resid.shape)} do not match tokens {tuple(tokens.shape)} in (batch, seq)"
        )
    special = torch.isin(tokens.to(resid.device), torch.as_tensor(list(special_ids), device=resid.device))
    return resid.masked_fill(special[..., None], 0.0)
