"""TopK SAE (Gao et al. 2024): keep the ``k`` largest pre-activations per token, then ReLU.

Latents stay sparse (values + indices) and decode by gathering ``k`` decoder rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE, SparseLatents


class TopKSAE(SAE):
    architecture = "topk"
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
