"""sae-hooks: sparse autoencoders inside TransformerLens, nnsight and plain PyTorch.

The core imports only torch, safetensors and huggingface_hub; framework adapters live in
:mod:`sae_hooks.adapters` and are imported on demand.
"""

from .config import FORMAT_VERSION, SAEConfig, Site
from .errors import (
    ConfigError,
    HookNotFoundError,
    SAEFormatError,
    SAEHooksError,
    ShapeMismatchError,
    UnknownArchitectureError,
)
from .native import load as load_native
from .native import save
from .saes import (
    SAE,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    ReLUSAE,
    SparseLatents,
    TopKSAE,
    build_sae,
    make_sae,
    register_sae_class,
)

from .hub import list_pretrained, load, load_many, push_to_hub

__version__ = "0.1.0"


def dashboard(sae, model, data, out_dir, **kwargs):  # noqa: ANN001, ANN201 - see build_dashboard
    """Write a static HTML feature browser for ``sae`` (see :func:`sae_hooks.eval.dashboard.build_dashboard`)."""
    from .eval.dashboard import build_dashboard

    return build_dashboard(sae, model, data, out_dir, **kwargs)


__all__ = [
    "FORMAT_VERSION", "SAEConfig", "Site",
    "ConfigError", "HookNotFoundError", "SAEFormatError", "SAEHooksError", "ShapeMismatchError",
    "UnknownArchitectureError",
    "load_native", "save",
    "SAE", "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "ReLUSAE", "SparseLatents", "TopKSAE",
    "build_sae", "make_sae", "register_sae_class",
    "load", "load_many", "list_pretrained", "push_to_hub",
    "dashboard",
]
