"""ReLU SAE ("standard" in SAELens): ``f = ReLU(x W_enc + b_enc)``, trained with an L1 penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SAE


class ReLUSAE(SAE):
    architecture = "relu"

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)
