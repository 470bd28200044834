"""Inference-time encoders over a trained decoder (O'Neill, Gumran & Klindt, arXiv 2411.13117):
ISTA / FISTA, inference-time optimisation (ITO), matching pursuit / orthogonal matching pursuit, and a
learned MLP encoder. ``with_encoder(sae, "fista", l1_coefficient=0.1)`` returns an SAE that encodes
with it and works everywhere an SAE does."""

from .core import (
    ENCODERS,
    FISTA,
    ISTA,
    ITO,
    MP,
    OMP,
    InferenceEncoderMixin,
    MLPEncoder,
    fit_mlp_encoder,
    make_encoder,
    with_encoder,
)
from .solvers import fista, ista, ito, lipschitz_constant, matching_pursuit, orthogonal_matching_pursuit

__all__ = [
    "ENCODERS", "FISTA", "ISTA", "ITO", "MP", "OMP", "InferenceEncoderMixin", "MLPEncoder", "fista",
    "fit_mlp_encoder", "ista", "ito", "lipschitz_constant", "make_encoder", "matching_pursuit",
    "orthogonal_matching_pursuit", "with_encoder",
]
