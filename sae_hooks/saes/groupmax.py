"""GroupMax SAE (EleutherAI sparsify ``activation="groupmax"``): the latents are split into ``k`` contiguous
groups of ``d_sae / k``; each group keeps only its largest pre-activation (after ReLU, so it may be 0).

Exactly ``k`` (value, index) pairs per token, decoded sparsely like TopK. Registered on import (by the sparsify
converter, which is imported with :mod:`sae_hooks`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE, SparseLatents
from .registry import register_sae_class


class GroupMaxSAE(SAE):
    architecture = "groupmax"
    uses_k = True
    sparse = True

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None or cfg.d_sae % cfg.k:
            raise ConfigError(f"groupmax needs k dividing d_sae={cfg.d_sae}, got k={cfg.k!r}")
        super().__init__(cfg)

    def activate(self, pre: Tensor) -> SparseLatents:
        k = int(self.cfg.k)  # type: ignore[arg-type]
        size = self.cfg.d_sae // k
        values, idx = pre.unflatten(-1, (k, size)).max(dim=-1)
        offsets = torch.arange(k, device=pre.device) * size
        return SparseLatents(torch.relu(values), idx + offsets, self.cfg.d_sae)


register_sae_class(GroupMaxSAE)  # inference only (no training spec)
