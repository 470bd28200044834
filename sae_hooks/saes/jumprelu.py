"""JumpReLU SAE (Rajamanoharan et al. 2024): ``f = ReLU(pre) * 1[pre > threshold]``, one threshold per latent."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SAEConfig
from .base import SAE


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    initial_threshold = 1e-3

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), self.initial_threshold, dtype=cfg.torch_dtype))

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)
