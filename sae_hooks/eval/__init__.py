"""Evaluation: reconstruction, CE/KL with an SAE spliced in (one definition), multi-layer and Jacobian
metrics, MDL description length, cross-seed latent matching, amortisation gap.

Import the submodules for the full API; the common names are re-exported here.
"""

from .reconstruction import explained_variance, fired, fvu, l0, reconstruction_metrics
from .splice import (
    SpliceRunner,
    hooks_splice_runner,
    keep_mask,
    kl_div,
    next_token_ce,
    sae_replace,
    scored_mask,
    splice_metrics,
    zero_replace,
)

__all__ = [
    "SpliceRunner",
    "explained_variance",
    "fired",
    "fvu",
    "hooks_splice_runner",
    "keep_mask",
    "kl_div",
    "l0",
    "next_token_ce",
    "reconstruction_metrics",
    "sae_replace",
    "scored_mask",
    "splice_metrics",
    "zero_replace",
]
