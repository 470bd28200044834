"""BatchTopK SAE (Bussmann et al. 2024).

Training keeps the ``k * n_tokens`` largest activations across the whole batch (:meth:`BatchTopKSAE.batch_topk`);
inference uses a single learned threshold, so a token's latents never depend on the rest of its batch:
``f = ReLU(pre) * 1[pre > threshold]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE


class BatchTopKSAE(SAE):
    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None:
            raise ConfigError("architecture 'batchtopk' needs k (average active latents per token)")
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=cfg.torch_dtype))

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def batch_topk(self, pre: Tensor) -> Tensor:
        """Training activation: the ``k * n_tokens`` largest ReLU'd pre-activations of the batch survive."""
        flat = torch.relu(pre.reshape(-1, pre.shape[-1]))
        n_keep = min(int(self.cfg.k) * flat.shape[0], flat.numel())  # type: ignore[arg-type]
        values, indices = flat.flatten().topk(n_keep, sorted=False)
        out = torch.zeros_like(flat.flatten()).scatter(0, indices, values)
        return out.reshape(pre.shape)
