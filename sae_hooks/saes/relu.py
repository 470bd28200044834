"""ReLU SAE ("standard" in SAELens): ``f = ReLU(x W_enc + b_enc)``, trained with an L1 penalty.

Training: ``mean ||y − y_hat||² + λ₁ · mean Σ_i f_i ||W_dec[i]||`` (L1 weighted by decoder norms, SAELens
"standard" / Anthropic April 2024); the decoder is not constrained to unit norm (the weighting does
that job), and it starts at norm 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SAE
from .registry import register_sae_class
from .training import ArchSettings, LossOutput, StepContext, TrainingSpec, reconstruction_loss


class ReLUSAE(SAE):
    architecture = "relu"

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)


@dataclass
class ReLUSettings(ArchSettings):
    """``l1_coefficient``: λ₁ (scaled by the trainer's sparsity warm-up)."""

    l1_coefficient: float = 5.0


class ReLUTraining(TrainingSpec):
    settings = ReLUSettings
    unit_norm_decoder = False

    def loss(self, sae: SAE, x: Tensor, target: Tensor | None, settings: ReLUSettings, ctx: StepContext) -> LossOutput:
        f, _ = sae.encode_normalized(x, training=True)
        sparsity = settings.l1_coefficient * ctx.sparsity * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        return reconstruction_loss(sae, x, target, f, sparsity)[0]


register_sae_class(ReLUSAE, spec=ReLUTraining())
