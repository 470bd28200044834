"""SAE architectures, one module each (the SAE class and its training spec), behind a registry by name.

Importing an architecture module registers it; this package imports every built-in one.
"""

from .base import SAE, NormState, SparseLatents, sparse_decode, to_dense
from .batchtopk import BatchTopKSAE
from .gated import GatedSAE
from .groupmax import GroupMaxSAE
from .jacobian import JacobianSAEPair, make_jsae_pair
from .jumprelu import JumpReLUSAE
from .multilayer import MultiLayerSAE, make_mlsae
from .registry import (
    ALIASES, build_sae, make_sae, register_sae_class, registered_architectures, sae_class, trainable_architectures,
    training_spec,
)
from .relu import ReLUSAE
from .topk import TopKSAE
from .training import ArchSettings, LossOutput, StepContext, TrainingSpec

__all__ = [
    "SAE", "NormState", "SparseLatents", "sparse_decode", "to_dense",
    "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE", "GroupMaxSAE", "MultiLayerSAE", "make_mlsae",
    "JacobianSAEPair", "make_jsae_pair",
    "ALIASES", "build_sae", "make_sae", "register_sae_class", "registered_architectures", "sae_class",
    "trainable_architectures", "training_spec", "ArchSettings", "LossOutput", "StepContext", "TrainingSpec",
]
