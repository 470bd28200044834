"""TopK SAE (Gao et al. 2024): keep the ``k`` largest pre-activations per token, then ReLU.

Latents stay sparse (values + indices) and decode by gathering ``k`` decoder rows.

Training (OpenAI's convention): ``mse_scale · mean ||y − y_hat||²`` with ``mse_scale = 1 / mean ||y −
mean y||²`` fixed from the first batches (≈ FVU), plus ``aux_coefficient · AuxK`` (:func:`~.training.auxk_nmse`
of :func:`~.training.dead_reconstruction` against the detached residual; ``aux_k = min(256, n_dead)``,
coefficient 1/32). The training encoder is sparse: the top-k is chosen on no-grad dense pre-activations
and the chosen values go through a gather with a sparse backward (:class:`~.kernels.GatherEncode`), so no
``(N, d_sae)`` gradient is formed. Unit-norm decoder rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE, SparseLatents
from .kernels import gather_encode
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

    def encode_normalized(self, x: Tensor, training: bool = False) -> tuple[SparseLatents, Tensor]:
        if not training:
            pre = self.pre_acts(x)
            return self.activate(pre), pre
        x_in = encoder_input(self, x)
        b_enc = self.b_enc if self.has_encoder_bias else None
        with torch.no_grad():
            pre = x_in @ self.W_enc
            if b_enc is not None:
                pre = pre + b_enc
            values, idx = pre.topk(self.k, dim=-1, sorted=False)
        acts = torch.relu(gather_encode(x_in, self.W_enc, b_enc, idx, values))
        return SparseLatents(acts, idx, self.cfg.d_sae, pre=pre), pre


def auxk_term(sae: SAE, x: Tensor, pre: Tensor, residual: Tensor, settings: AuxKSettings, ctx: StepContext) -> Tensor | None:
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
