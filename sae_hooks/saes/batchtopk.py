"""BatchTopK SAE (Bussmann et al. 2024).

Training keeps the ``k * n_tokens`` largest activations across the whole batch (:meth:`BatchTopKSAE.batch_topk`);
inference uses a single learned threshold, so a token's latents never depend on the rest of its batch:
``f = ReLU(pre) * 1[pre > threshold]``.

Training: TopK's losses (normalised MSE + AuxK) with the batch-level top ``k·N``, sparse like TopK's: the
batch top-k is chosen block by block on no-grad pre-activations (:func:`~.kernels.batch_topk_select`,
at most one ``(rows, d_sae)`` block at a time), a gather with a sparse backward gives the kept values
and the decode is an ``embedding_bag`` with a sparse backward; the latents are ragged
:class:`~.base.SparseLatents` (a different count per token), and no ``(N, d_sae)`` tensor or gradient
is formed (:meth:`BatchTopKSAE.batch_topk` is the dense definition, kept as the reference). The
inference threshold is an exponential moving average of the smallest activation the batch top-k kept:
``θ ← θ + threshold_lr · (min_kept − θ)`` (first step: ``θ = min_kept``), as in Bussmann et al. /
SAELens (``topk_threshold_lr = 0.01``). It moves only when the optimiser step is taken (a skipped,
non-finite batch leaves it alone), and data-parallel ranks average it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE, SparseLatents
from .kernels import batch_topk_select, gather_encode_ragged
from .registry import register_sae_class
from .topk import auxk_term
from .training import AuxKSettings, LossOutput, StepContext, TrainingSpec, encoder_input, reconstruction_loss


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    uses_k = True

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None:
            raise ConfigError("architecture 'batchtopk' needs k (average active latents per token)")
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=cfg.torch_dtype))

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def encode_normalized(self, x: Tensor, training: bool = False) -> tuple[Tensor, Tensor]:
        """Dense latents; with ``training=True`` the batch top-k (:meth:`batch_topk`, the dense definition,
        for generic callers). The training losses (BatchTopK's and Matryoshka's) use
        :meth:`encode_sparse_training`: the same latents, never dense."""
        pre = self.pre_acts(x)
        return (self.batch_topk(pre) if training else self.activate(pre)), pre

    def encode_sparse_training(self, x: Tensor) -> SparseLatents:
        """The training latents of ``x (..., d_in)`` (flattened to ``N`` tokens) as ragged
        :class:`SparseLatents` (``crow`` set): the batch top-k chosen block by block, values through a
        gather with a sparse backward; no ``(N, d_sae)`` tensor. Equal to :meth:`batch_topk` of the
        pre-activations."""
        x_in = encoder_input(self, x).reshape(-1, self.cfg.d_in)
        b_enc = self.b_enc if self.has_encoder_bias else None
        n_keep = min(int(self.cfg.k) * x_in.shape[0], x_in.shape[0] * self.cfg.d_sae)  # type: ignore[arg-type]
        sel = batch_topk_select(x_in.detach(), self.W_enc, b_enc, n_keep)
        acts = torch.relu(gather_encode_ragged(x_in, self.W_enc, b_enc, sel))
        return SparseLatents(acts, sel.cols, self.cfg.d_sae, crow=sel.crow)

    def batch_topk(self, pre: Tensor) -> Tensor:
        """Training activation: the ``k * n_tokens`` largest ReLU'd pre-activations of the batch survive."""
        flat = torch.relu(pre.reshape(-1, pre.shape[-1]))
        n_keep = min(int(self.cfg.k) * flat.shape[0], flat.numel())  # type: ignore[arg-type]
        values, indices = flat.flatten().topk(n_keep, sorted=False)
        out = torch.zeros_like(flat.flatten()).scatter(0, indices, values)
        return out.reshape(pre.shape)


@dataclass
class BatchTopKSettings(AuxKSettings):
    """AuxK settings plus ``threshold_lr``, the inference threshold's EMA rate."""

    threshold_lr: float = 0.01


class BatchTopKTraining(TrainingSpec):
    settings = BatchTopKSettings
    synced_buffers = ("threshold",)

    def loss(self, sae: BatchTopKSAE, x: Tensor, target: Tensor | None, settings: BatchTopKSettings, ctx: StepContext) -> LossOutput:
        y = x if target is None else target
        f = sae.encode_sparse_training(x)  # AuxK then recomputes the dead latents' columns only
        out, y_hat = reconstruction_loss(sae, x, target, f, 0.0, scale=ctx.mse_scale)
        aux = auxk_term(sae, x, None, (y - y_hat).detach(), settings, ctx)
        if aux is not None:
            out.loss = out.loss + aux
            out.metrics["aux"] = aux.detach()
        with torch.no_grad():
            kept = f.values[f.values > 0]
            if kept.numel():
                out.updates["min_kept"] = kept.min()
        return out

    @torch.no_grad()
    def after_step(self, sae: BatchTopKSAE, settings: BatchTopKSettings, out: LossOutput, first: bool) -> None:
        low = out.updates.get("min_kept")
        if low is None:
            return
        low = low.to(sae.threshold.dtype)
        if first:
            sae.threshold.copy_(low)
        else:
            sae.threshold.add_(settings.threshold_lr * (low - sae.threshold))


register_sae_class(BatchTopKSAE, spec=BatchTopKTraining())
