"""Signed TopK (the sparsifier of SplInterp / PAM-SGD, Budd et al. 2025): keep the ``k`` pre-activations of
largest **magnitude** per token, with their signs; no ReLU.

``f = pre · 1[|pre| among the k largest |pre|]``. Latents stay sparse (values + indices, values may be
negative) and decode by gathering ``k`` decoder rows, as TopK does.

Training (with Adam): ``mse_scale · mean ||y − y_hat||²`` (TopK's normalised MSE); the training encoder is
sparse like TopK's (the selection on no-grad pre-activations, the chosen values through a gather with a
sparse backward). No AuxK (the paper has none). Unit-norm decoder rows with Adam; PAM-SGD
(:mod:`sae_hooks.train.pam`) solves the decoder in closed form instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE, SparseLatents
from .kernels import gather_encode
from .registry import register_sae_class
from .training import LossOutput, StepContext, TrainingSpec, encoder_input, reconstruction_loss


class SignedTopKSAE(SAE):
    architecture = "signed_topk"
    uses_k = True
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
            idx = pre.abs().topk(self.k, dim=-1, sorted=False).indices
            values = pre.gather(-1, idx)
        return SparseLatents(gather_encode(x_in, self.W_enc, b_enc, idx, values), idx, self.cfg.d_sae), pre


class SignedTopKTraining(TrainingSpec):
    def loss(self, sae: SignedTopKSAE, x: Tensor, target: Tensor | None, settings, ctx: StepContext) -> LossOutput:  # noqa: ANN001
        lat, _ = sae.encode_normalized(x, training=True)
        return reconstruction_loss(sae, x, target, lat, 0.0, scale=ctx.mse_scale)[0]


register_sae_class(SignedTopKSAE, spec=SignedTopKTraining())
