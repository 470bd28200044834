"""Framework adapters, installed as ``sae_hooks.adapters``.

Each submodule imports its framework; import only the one you use:

* :mod:`sae_hooks.adapters.transformer_lens` — TransformerLens 4 ``TransformerBridge`` and the
  ``HookedTransformer`` of TransformerLens 2.x/3.x;
* :mod:`sae_hooks.adapters.torch` — any ``torch.nn.Module`` (e.g. a Hugging Face model);
* :mod:`sae_hooks.adapters.nnsight` — nnsight 0.8 ``NNsight`` / ``LanguageModel``.

Nothing here is imported eagerly, so ``import sae_hooks`` never pulls a framework in.
"""
