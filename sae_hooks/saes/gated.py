"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude path how much.

``gate = 1[x W_enc + b_gate > 0]``, ``mag = ReLU(x (W_enc * exp(r_mag)) + b_mag)``, ``f = gate * mag``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SAEConfig
from .base import SAE


class GatedSAE(SAE):
    architecture = "gated"
    has_encoder_bias = False

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        dtype = cfg.torch_dtype
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))

    def pre_acts(self, x: Tensor) -> Tensor:
        """The gate pre-activations (what decides which latents are active)."""
        return super().pre_acts(x) + self.b_gate

    def encode_with_state(self, x: Tensor):  # noqa: ANN201 - same as base
        x = self.flatten_input(x).to(self.dtype)
        x, state = self.normalize_input(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        hidden = x @ self.W_enc
        gate = (hidden + self.b_gate) > 0
        magnitude = torch.relu(hidden * torch.exp(self.r_mag) + self.b_mag)
        return gate * magnitude, state

    def activate(self, pre: Tensor) -> Tensor:  # pragma: no cover - encode_with_state is overridden
        raise NotImplementedError("GatedSAE computes latents in encode_with_state")
