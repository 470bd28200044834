"""Signed TopK (the sparsifier of SplInterp / PAM-SGD, Budd et al. 2025): keep the ``k`` pre-activations of
largest **magnitude** per token, with their signs; no ReLU.

``f = pre · 1[|pre| among the k largest |pre|]``. Latents stay sparse (values + indices, values may be
negative) and decode by gathering ``k`` decoder rows, as TopK does.
"""

from __future__ import annotations

from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE, SparseLatents


class SignedTopKSAE(SAE):
    architecture = "signed_topk"
    sparse = True

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None:
            raise ConfigError("architecture 'signed_topk' needs k (active latents per token)")
        super().__init__(cfg)

    @property
    def k(self) -> int:
        return int(self.cfg.k)  # type: ignore[arg-type]

    def activate(self, pre: Tensor) -> SparseLatents:
        idx = pre.abs().topk(self.k, dim=-1, sorted=False).indices
        return SparseLatents(pre.gather(-1, idx), idx, self.cfg.d_sae)
