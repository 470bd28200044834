"""JumpReLU SAE (Rajamanoharan et al. 2024): ``f = ReLU(pre) * 1[pre > threshold]``, one threshold per latent.

Training: ``mean ||y − y_hat||² + λ₀ · mean Σ_i H(π_i − θ_i)`` with the straight-through
pseudo-derivatives of :mod:`.kernels` (rectangle kernel, ``bandwidth`` ε); thresholds start at
``init_threshold`` and are clamped at 0 after each step; unit-norm decoder rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import SAEConfig
from .base import SAE
from .kernels import jumprelu, step
from .registry import register_sae_class
from .training import ArchSettings, LossOutput, StepContext, TrainingSpec, reconstruction_loss


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    initial_threshold = 1e-3
    #: the straight-through bandwidth ε used by ``encode_normalized(training=True)``.
    bandwidth = 0.05

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), self.initial_threshold, dtype=cfg.torch_dtype))

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def encode_normalized(self, x: Tensor, training: bool = False) -> tuple[Tensor, Tensor]:
        pre = self.pre_acts(x)
        if not training:
            return self.activate(pre), pre
        return jumprelu(pre, self.threshold, self.bandwidth), pre


@dataclass
class JumpReLUSettings(ArchSettings):
    """``l0_coefficient`` λ₀, ``bandwidth`` ε of the straight-through estimator, ``init_threshold`` θ₀."""

    l0_coefficient: float = 0.5
    bandwidth: float = 0.05
    init_threshold: float = 1.0


class JumpReLUTraining(TrainingSpec):
    settings = JumpReLUSettings

    @torch.no_grad()
    def init(self, sae: JumpReLUSAE, settings: JumpReLUSettings) -> None:
        sae.threshold.fill_(settings.init_threshold)

    def loss(self, sae: JumpReLUSAE, x: Tensor, target: Tensor | None, settings: JumpReLUSettings, ctx: StepContext) -> LossOutput:
        sae.bandwidth = settings.bandwidth
        f, pre = sae.encode_normalized(x, training=True)
        l0 = step(pre, sae.threshold, settings.bandwidth).sum(-1).mean()
        return reconstruction_loss(sae, x, target, f, settings.l0_coefficient * ctx.sparsity * l0)[0]

    @torch.no_grad()
    def after_step(self, sae: JumpReLUSAE, settings: JumpReLUSettings, out: LossOutput, first: bool) -> None:
        sae.threshold.clamp_(min=0.0)


register_sae_class(JumpReLUSAE, spec=JumpReLUTraining())
