"""Matryoshka SAEs (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries.

A BatchTopK SAE (training: the ``k·N`` largest activations of the batch; inference: one learned threshold)
whose loss sums the reconstruction errors of nested prefixes of the dictionary: with cumulative widths
``m_1 < m_2 < … < m_G = d_sae`` (``cfg.matryoshka_widths``, SAELens's name), prefix ``g`` reconstructs
``x`` from latents ``0 … m_g − 1`` only. Early latents must therefore work on their own and learn the
general features; later ones refine.

dictionary_learning stores the same thing as ``group_sizes`` (the differences of the widths).

Training: BatchTopK activations (the ``k·N`` largest of the batch, as both reference implementations;
sparse and ragged as in BatchTopK's training, so no ``(N, d_sae)`` tensor or gradient is formed: each
prefix decodes only its own latents' entries), ``mse_scale · Σ_g w_g · mean ||y − y_hat_g||²`` over the prefixes with ``w_g = 1/G`` by default (the mean
over prefixes: Bussmann et al.'s code and dictionary_learning's default ``group_weights``; SAELens sums
the inner prefixes' MSE onto the full one, i.e. ``prefix_weights=[1, …, 1]``), plus AuxK on the full
reconstruction's residual and BatchTopK's threshold EMA for inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import NormState
from .batchtopk import BatchTopKSAE, BatchTopKSettings, BatchTopKTraining
from .kernels import crow_rows, row_pointers, sparse_decode_ragged
from .registry import register_sae_class
from .topk import auxk_term
from .training import LossOutput, StepContext, fired_and_l0, mse, skip_term


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"

    def __init__(self, cfg: SAEConfig) -> None:
        widths = cfg.matryoshka_widths
        if not widths:
            widths = [cfg.d_sae]
        if widths[-1] != cfg.d_sae:
            widths = [*widths, cfg.d_sae]
        if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] <= 0 or widths[-1] != cfg.d_sae:
            raise ConfigError(
                f"matryoshka_widths must increase strictly from > 0 up to d_sae={cfg.d_sae}, got {cfg.matryoshka_widths}"
            )
        cfg = cfg.replace(matryoshka_widths=list(widths))
        super().__init__(cfg)

    @property
    def widths(self) -> list[int]:
        return list(self.cfg.matryoshka_widths)  # type: ignore[arg-type]

    def decode_prefix(self, latents: Tensor, width: int, state: NormState | None = None) -> Tensor:
        """Reconstruction ``(..., d_out)`` from the first ``width`` latents of dense ``latents (..., d_sae)``."""
        if not 0 < width <= self.cfg.d_sae:
            raise ConfigError(f"prefix width must be in [1, {self.cfg.d_sae}], got {width}")
        y = latents[..., :width].to(self.dtype) @ self.W_dec[:width] + self.b_dec
        return self.denormalize_output(y, state)


def widths_from_group_sizes(group_sizes: list[int]) -> list[int]:
    """dictionary_learning's ``group_sizes`` -> cumulative ``matryoshka_widths``."""
    out, total = [], 0
    for g in group_sizes:
        total += int(g)
        out.append(total)
    return out


@dataclass
class MatryoshkaSettings(BatchTopKSettings):
    """Plus ``prefix_weights``: one weight per prefix (``None``: ``1/G`` each)."""

    prefix_weights: list[float] | None = None


class MatryoshkaTraining(BatchTopKTraining):
    settings = MatryoshkaSettings

    def loss(self, sae: MatryoshkaSAE, x: Tensor, target: Tensor | None, settings: MatryoshkaSettings, ctx: StepContext) -> LossOutput:  # type: ignore[override]
        y = x if target is None else target
        widths = sae.widths
        weights = settings.prefix_weights if settings.prefix_weights is not None else [1.0 / len(widths)] * len(widths)
        if len(weights) != len(widths):
            raise ConfigError(f"prefix_weights has {len(weights)} entries for the {len(widths)} prefixes {widths}")
        # BatchTopK's sparse training latents (ragged, token-major): prefix g adds the entries of latents
        # [m_{g-1}, m_g), decoded as their own token-major sub-selection.
        f = sae.encode_sparse_training(x)
        rows = crow_rows(f.crow)  # type: ignore[arg-type]
        n_tokens = f.crow.numel() - 1  # type: ignore[union-attr]
        y_hat = sae.b_dec + skip_term(sae, x)
        total: Tensor | float = 0.0
        start = 0
        for w_g, m in zip(weights, widths):
            part = ((f.indices >= start) & (f.indices < m)).nonzero().squeeze(1)
            crow = row_pointers(rows[part], n_tokens)
            y_hat = y_hat + sparse_decode_ragged(f.values[part], f.indices[part], crow, sae.W_dec)
            total = total + w_g * mse(y, y_hat)
            start = m
        err = mse(y, y_hat)
        loss = ctx.mse_scale * total
        fired, l0 = fired_and_l0(f, sae.cfg.d_sae)
        metrics = {"mse": err.detach(), "l0": l0}
        aux = auxk_term(sae, x, None, (y - y_hat).detach(), settings, ctx)  # dead columns recomputed only
        if aux is not None:
            loss = loss + aux
            metrics["aux"] = aux.detach()
        out = LossOutput(loss, fired, metrics)  # type: ignore[arg-type]
        with torch.no_grad():
            kept = f.values[f.values > 0]
            if kept.numel():
                out.updates["min_kept"] = kept.min()
        return out


@torch.no_grad()
def prefix_fvu(sae: MatryoshkaSAE, x: Tensor, widths: list[int] | None = None) -> dict[int, float]:
    """FVU of each prefix with the inference encoder on ``x (N, d_in)`` (model space):
    ``Σ ||x − x_hat_m||² / Σ ||x − mean x||²`` for ``m`` in ``widths`` (default the SAE's)."""
    latents, state = sae.encode_with_state(x)
    dense = latents if isinstance(latents, Tensor) else latents.to_dense()
    var = (x - x.mean(0)).pow(2).sum()
    return {m: float((x - sae.decode_prefix(dense, m, state)).pow(2).sum() / var) for m in (widths or sae.widths)}


register_sae_class(MatryoshkaSAE, spec=MatryoshkaTraining())
