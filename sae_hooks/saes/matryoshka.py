"""Matryoshka SAEs (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries.

A BatchTopK SAE (training: the ``k·N`` largest activations of the batch; inference: one learned threshold)
whose loss sums the reconstruction errors of nested prefixes of the dictionary: with cumulative widths
``m_1 < m_2 < … < m_G = d_sae`` (``cfg.matryoshka_widths``, SAELens's name), prefix ``g`` reconstructs
``x`` from latents ``0 … m_g − 1`` only. Early latents must therefore work on their own and learn the
general features; later ones refine.

dictionary_learning stores the same thing as ``group_sizes`` (the differences of the widths).
"""

from __future__ import annotations

from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import NormState
from .batchtopk import BatchTopKSAE


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
