"""SAE architectures, one module each, behind a registry by name."""

from .base import SAE, NormState, SparseLatents, sparse_decode, to_dense
from .batchtopk import BatchTopKSAE
from .choice import FeatureChoiceSAE, MutualChoiceSAE
from .gated import GatedSAE
from .groupmax import GroupMaxSAE
from .jacobian import JacobianSAEPair, attach_pair, make_jsae_pair
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .multilayer import MultiLayerSAE, make_mlsae
from .registry import ALIASES, build_sae, make_sae, register_sae_class, registered_architectures, sae_class
from .relu import ReLUSAE
from .signed_topk import SignedTopKSAE
from .topk import TopKSAE

for _cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE, GroupMaxSAE, MultiLayerSAE,
             SignedTopKSAE, FeatureChoiceSAE, MutualChoiceSAE, MatryoshkaSAE):
    register_sae_class(_cls)

__all__ = [
    "SAE", "NormState", "SparseLatents", "sparse_decode", "to_dense",
    "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE", "GroupMaxSAE", "MultiLayerSAE",
    "SignedTopKSAE", "FeatureChoiceSAE", "MutualChoiceSAE", "MatryoshkaSAE",
    "JacobianSAEPair", "attach_pair", "make_jsae_pair", "make_mlsae",
    "ALIASES", "build_sae", "make_sae", "register_sae_class", "registered_architectures", "sae_class",
]
