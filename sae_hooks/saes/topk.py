"""TopK SAE (Gao et al. 2024): keep the ``k`` largest pre-activations per token, then ReLU.

Latents stay sparse (values + indices) and decode by gathering ``k`` decoder rows.

Training (OpenAI's convention): ``mse_scale · mean ||y − y_hat||²`` with ``mse_scale = 1 / mean ||y −
mean y||²`` fixed from the first batches (≈ FVU), plus ``aux_coefficient · AuxK`` (:func:`~.training.auxk_nmse`
of :func:`~.training.dead_reconstruction` against the detached residual; ``aux_k = min(256, n_dead)``,
coefficient 1/32). The training encoder is sparse: the top-k is chosen block by block on no-grad
pre-activations (:func:`~.kernels.topk_select`, at most one ``(rows, d_sae)`` block at a time), the chosen
values go through a gather with a sparse backward (:class:`~.kernels.GatherEncode`) and the decode has a
sparse backward too (:class:`~.kernels.SparseDecode`): no ``(N, d_sae)`` tensor or gradient is formed.
Unit-norm decoder rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE, SparseLatents
from .kernels import gather_encode, topk_select
from .registry import register_sae_class
from .training import AuxKSettings, LossOutput, StepContext, TrainingSpec, auxk_nmse, dead_reconstruction, encoder_input, reconstruction_loss


class TopKSAE(SAE):
    architecture = "topk"
    uses_k = True
    sparse = True

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None:
            raise ConfigError(f"architecture {cfg.architecture!r} needs k (active latents per token)")
        super().__init__(cfg)

    @property
    def k(self) -> int:
        return int(self.cfg.k)  # type: ignore[arg-type]

    def activate(self, pre: Tensor) -> SparseLatents:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return SparseLatents(torch.relu(values), indices, self.cfg.d_sae)

    def encode_normalized(self, x: Tensor, training: bool = False) -> tuple[SparseLatents, Tensor | None]:
        if not training and torch.is_grad_enabled() and (x.requires_grad or self.W_enc.requires_grad):
            pre = self.pre_acts(x)  # differentiable: attribution through the latents
            return self.activate(pre), pre
        x_in = encoder_input(self, x)
        b_enc = self.b_enc if self.has_encoder_bias else None
        if not training:
            # No-grad inference: the same blocked selection, one (rows, d_sae) block at a time; the
            # pre-activations (..., d_sae) only come back when they fit in one block.
            lead = x_in.shape[:-1]
            sel = topk_select(x_in.reshape(-1, x_in.shape[-1]), self.W_enc, b_enc, self.k, keep_pre=True)
            pre = None if sel.pre is None else sel.pre.view(*lead, self.cfg.d_sae)
            values, indices = torch.relu_(sel.values).view(*lead, self.k), sel.indices.view(*lead, self.k)
            return SparseLatents(values, indices, self.cfg.d_sae), pre
        # Blocked: one (rows, d_sae) pre-activation block at a time. The pre-activations ride along
        # (for AuxK) only when they fit in one block; otherwise AuxK recomputes the dead latents'
        # columns only (training.dead_reconstruction).
        sel = topk_select(x_in.detach(), self.W_enc, b_enc, self.k, keep_pre=True)
        acts = torch.relu(gather_encode(x_in, self.W_enc, b_enc, sel.indices, sel.values))
        return SparseLatents(acts, sel.indices, self.cfg.d_sae, pre=sel.pre), sel.pre


def auxk_term(sae: SAE, x: Tensor, pre: Tensor | None, residual: Tensor, settings: AuxKSettings, ctx: StepContext) -> Tensor | None:
    """``aux_coefficient · AuxK`` in OpenAI's normalisation, or ``None`` (no dead latent / disabled)."""
    if not settings.aux_coefficient:
        return None
    recon = dead_reconstruction(sae, encoder_input(sae, x), pre, ctx.dead, settings.aux_k)
    return None if recon is None else settings.aux_coefficient * auxk_nmse(recon, residual, ctx.aux_denom)


class TopKTraining(TrainingSpec):
    settings = AuxKSettings

    def loss(self, sae: TopKSAE, x: Tensor, target: Tensor | None, settings: AuxKSettings, ctx: StepContext) -> LossOutput:
        y = x if target is None else target
        lat, pre = sae.encode_normalized(x, training=True)
        out, y_hat = reconstruction_loss(sae, x, target, lat, 0.0, scale=ctx.mse_scale)
        aux = auxk_term(sae, x, pre, (y - y_hat).detach(), settings, ctx)
        if aux is not None:
            out.loss = out.loss + aux
            out.metrics["aux"] = aux.detach()
        return out


register_sae_class(TopKSAE, spec=TopKTraining())
