"""SAE architectures, one module each, behind a registry by name."""

from .base import SAE, NormState, SparseLatents, sparse_decode, to_dense
from .batchtopk import BatchTopKSAE
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .registry import ALIASES, build_sae, make_sae, register_sae_class, registered_architectures, sae_class
from .relu import ReLUSAE
from .topk import TopKSAE

for _cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE):
    register_sae_class(_cls)

from .multilayer import MultiLayerSAE, make_mlsae  # noqa: E402
from .jacobian import JacobianSAEPair, attach_pair, make_jsae_pair  # noqa: E402

register_sae_class(MultiLayerSAE)

__all__ = [
    "SAE", "NormState", "SparseLatents", "sparse_decode", "to_dense",
    "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE",
    "ALIASES", "build_sae", "make_sae", "register_sae_class", "registered_architectures", "sae_class",
]
