"""A Hugging Face causal LM as a TransformerLens or nnsight model (what ``sae-hooks train --framework`` runs).

>>> from sae_hooks.adapters.frameworks import as_framework
>>> bridge = as_framework("transformer-lens", hf_model, tokenizer, folder)   # TransformerBridge
>>> lm = as_framework("nnsight", hf_model, tokenizer)                        # nnsight TransformersModel

``torch`` returns the model unchanged. Each framework is imported only when asked for. The wrapped model
holds the same weights (no copy), so activations read through it equal the Hugging Face module's.
"""

from __future__ import annotations

import os
from typing import Any

from sae_hooks.errors import ConfigError

#: ``--framework`` choices.
FRAMEWORKS = ("torch", "transformer-lens", "nnsight")


def as_framework(framework: str, hf_model: Any, tokenizer: Any, folder: str | os.PathLike | None = None,
                 device: Any = None) -> Any:
    """``hf_model`` wrapped for ``framework``:

    * ``"torch"``: the model itself (sites through its module tree, TransformerLens names translated);
    * ``"transformer-lens"``: a TransformerLens 4 ``TransformerBridge`` booted around ``hf_model``
      (``boot_transformers(folder, hf_model=..., tokenizer=...)``: no download, the bridge reads only the
      configuration from ``folder``); the bridge wraps the model's modules in place;
    * ``"nnsight"``: an nnsight ``TransformersModel`` (0.8.1's name for ``LanguageModel``; ``LanguageModel``
      on older releases) around ``hf_model`` with ``tokenizer``.
    """
    if framework == "torch":
        return hf_model
    if framework == "transformer-lens":
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError as e:
            raise ConfigError(
                "--framework transformer-lens needs TransformerLens 4 (its TransformerBridge): "
                "pip install 'sae-hooks[transformer-lens]'. A 2.x/3.x HookedTransformer can be passed to "
                "LiveSource from Python."
            ) from e
        if folder is None:
            raise ConfigError("a TransformerBridge is booted from the model's folder (its config.json): pass folder=")
        kwargs = {"device": str(device)} if device is not None else {}
        return TransformerBridge.boot_transformers(str(folder), hf_model=hf_model, tokenizer=tokenizer, **kwargs)
    if framework == "nnsight":
        try:
            import nnsight
        except ImportError as e:
            raise ConfigError("--framework nnsight needs nnsight 0.8: pip install 'sae-hooks[nnsight]'") from e
        # nnsight 0.8.1 deprecates LanguageModel for TransformersModel (same envoy, same hooks)
        cls = getattr(nnsight, "TransformersModel", None) or nnsight.LanguageModel
        return cls(hf_model, tokenizer=tokenizer)
    raise ConfigError(f"unknown framework {framework!r}; choose one of {list(FRAMEWORKS)}")
