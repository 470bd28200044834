"""TransformerLens adapter: ``model.add_sae`` on a TL 4 ``TransformerBridge`` or a TL 2.x/3.x ``HookedTransformer``.

>>> from sae_hooks.adapters.transformer_lens import attach
>>> model = attach(bridge)                     # returns the same model object, now with add_sae
>>> att = model.add_sae(sae, error_term=True)  # at sae.cfg's hook, e.g. "blocks.3.hook_resid_post"
>>> logits, cache = model.run_with_cache(tokens)
>>> cache["blocks.3.hook_resid_post.hook_sae_acts_post"]  # (batch, pos, d_sae)

SAEs run inside permanent hooks on the model's own ``HookPoint``s, so ``run_with_cache``,
``run_with_hooks``, ``generate`` and ``reset_hooks()`` keep working; the SAE's tensors are published as
extra HookPoints named ``"{hook}.hook_sae_{input,acts_post,recons,error,output}"`` (SAELens's names)
that ``run_with_cache`` records and ``run_with_hooks`` can edit.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sae_hooks.intervene import RECORD_NAMES, Remover, SAEManager
from sae_hooks.sites import HookDictSites

from ._binding import bind, wrap_generation
from ._foreign import convert_foreign

try:  # TransformerLens is required by this adapter only.
    from transformer_lens.hook_points import HookPoint
except ImportError as e:  # pragma: no cover - exercised only without TL installed
    raise ImportError(
        "sae_hooks.adapters.transformer_lens needs TransformerLens: pip install 'sae-hooks[transformer-lens]'"
    ) from e


def attach(model: Any) -> Any:
    """Give ``model`` the SAE API (``add_sae``, ``remove_sae``, ``reset_saes``, ``saes``); return it.

    Idempotent: attaching twice reuses the same manager.
    """
    if "sae_manager" in getattr(model, "__dict__", {}):
        return model
    if not hasattr(model, "hook_dict"):
        raise TypeError(
            f"{type(model).__name__} is not a TransformerLens model (no hook_dict); "
            "use sae_hooks.adapters.torch.attach for a plain nn.Module"
        )
    backend = TransformerLensBackend(model)
    manager = SAEManager(backend, convert_foreign)
    backend.manager = manager
    bind(model, manager)
    check = _kv_cache_check if backend.is_bridge and _TL_VERSION.startswith("4.3.") else None
    wrap_generation(model, manager, ("generate", "generate_stream"), check)
    wrap_generation(model, manager, ("hf_generate",))
    backend.install_context_hooks()
    _wrap_reset(model, backend)
    return model


_TL_VERSION = importlib.metadata.version("transformer_lens") if importlib.util.find_spec("transformer_lens") else ""
KV_CACHE_WARNING = (
    "TransformerLens 4.3's TransformerBridge.generate gives wrong logits with its KV cache (even with no SAE "
    "attached; the generated tokens then differ from Hugging Face generate). Pass use_past_kv_cache=False "
    "for exact generation."
)
_warned: dict[str, bool] = {}


def _kv_cache_check(kwargs: dict[str, Any]) -> None:
    """Warn once per process when a TL 4.3 bridge is about to generate with its (defective) KV cache."""
    if kwargs.get("use_past_kv_cache", True) and not _warned.get("kv"):
        _warned["kv"] = True
        warnings.warn(KV_CACHE_WARNING, UserWarning, stacklevel=3)


def _wrap_reset(model: Any, backend: TransformerLensBackend) -> None:
    """``reset_hooks(including_permanent=True)`` (and ``remove_all_hook_fns``) would remove the adapter's
    permanent hooks behind its back: detach the SAEs properly first, and reinstall the adapter's own
    position-tracking hook afterwards, so nothing stale stays listed and position filters stay right."""
    for name in ("reset_hooks", "remove_all_hook_fns"):
        original = getattr(model, name, None)
        if original is None or getattr(original, "_sae_hooks_wrapped", False):
            continue
        signature = inspect.signature(original)

        @functools.wraps(original)
        def reset(*args: Any, _original=original, _signature=signature, **kwargs: Any) -> Any:
            bound = _signature.bind(*args, **kwargs).arguments
            forward_too = bound.get("direction", "both") in ("fwd", "both")
            permanent = bool(bound.get("including_permanent", False)) and forward_too
            if permanent:
                backend.manager.reset_saes()
            try:
                return _original(*args, **kwargs)
            finally:
                if permanent:
                    backend.install_first_block_hook()

        reset._sae_hooks_wrapped = True  # type: ignore[attr-defined]
        model.__dict__[name] = reset


class _HookPointRecorder:
    """Publishes an SAE's tensors through HookPoints registered on the model under ``prefix``."""

    def __init__(self, points: dict[str, HookPoint]):
        self.points = points

    def wants(self, name: str) -> bool:
        point = self.points[name]
        return bool(point.fwd_hooks or point.bwd_hooks)  # a backward hook alone needs the tensor too

    def __call__(self, name: str, value: Tensor) -> Tensor:
        point = self.points[name]
        if point.bwd_hooks and torch.is_grad_enabled() and value.is_floating_point() and not value.requires_grad:
            # A tensor kept out of the graph (the detached error term) with a backward hook on it: pass a leaf
            # that requires grad (same values) so the hook gets the gradient reaching it; nothing flows on.
            value = value.detach().requires_grad_(True)
        return point(value)


class TransformerLensBackend(HookDictSites):
    """A :class:`~sae_hooks.intervene.Backend` over the model's ``HookPoint``\\ s (sites resolved by
    :class:`~sae_hooks.sites.HookDictSites`: hook names, and module paths of a bridge's HF model)."""

    def __init__(self, model: Any):
        super().__init__(model)
        self.manager: SAEManager | None = None

    def install(self, site: str, fn: Callable[[Tensor], Tensor | None]) -> Remover:
        """A permanent hook on the site's ``HookPoint`` (so ``reset_hooks()`` keeps it); a module site
        without a hook point gets a plain forward hook."""
        site = self.resolve(site)
        if not self.is_hook_point(site):
            return super().install(site, fn)
        hp = self.hook_point(site)

        def sae_hook(activation: Tensor, hook: Any) -> Tensor | None:
            return fn(activation)

        before = list(hp.fwd_hooks)
        if self.is_bridge:
            self.model.add_hook(site, sae_hook, is_permanent=True)
        else:
            hp.add_hook(sae_hook, dir="fwd", is_permanent=True)
        added = [h for h in hp.fwd_hooks if h not in before]

        def remove() -> None:
            for handle in added:
                handle.hook.remove()
                if handle in hp.fwd_hooks:
                    hp.fwd_hooks.remove(handle)

        return remove

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def run_with_cache(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return self.model.run_with_cache(*args, **kwargs)

    def recorder(self, prefix: str) -> tuple[_HookPointRecorder, Remover]:
        points = {}
        for record_name in RECORD_NAMES:
            hp = HookPoint()
            hp.name = f"{prefix}.{record_name}"
            points[record_name] = hp
        registries = self._registries()
        for hp in points.values():
            for registry in registries:
                registry[hp.name] = hp

        def unpublish() -> None:
            for hp in points.values():
                hp.remove_hooks("both", including_permanent=True)
                for registry in registries:
                    if registry.get(hp.name) is hp:
                        del registry[hp.name]

        return _HookPointRecorder(points), unpublish

    def _registries(self) -> list[dict]:
        if self.is_bridge:
            return [self.model._hook_registry]
        return [self.model.hook_dict, self.model.mod_dict]

    # Forward context: token ids for token filters, positions during generation ------------------

    def install_context_hooks(self) -> None:
        """Tell the manager, once per forward, the sequence length, token ids and attention mask.

        ``generate`` may call ``forward`` directly (so module hooks on the root don't fire) and may
        start from embeddings, so: the embedding module reports the token ids it is fed (all of them,
        or only the new ones), and ``blocks.0.hook_resid_pre`` — which every forward passes — starts
        the forward with the true sequence length. The root's pre-hook adds the attention mask.
        """
        manager = self.manager
        assert manager is not None
        # What this thread's forward has seen so far (another thread's forward must not read it).
        pending = threading.local()

        def root_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            pending.mask = kwargs.get("attention_mask")

        def embed_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            tokens = args[0] if args else kwargs.get("input_ids", kwargs.get("tokens"))
            if isinstance(tokens, Tensor) and tokens.dim() == 2 and not tokens.is_floating_point():
                pending.tokens = tokens

        def first_block_hook(resid: Tensor, hook: Any) -> None:
            tokens, mask = getattr(pending, "tokens", None), getattr(pending, "mask", None)
            manager.begin_forward(tokens, resid.shape[1] if resid.dim() >= 2 else 0, mask)
            pending.tokens = pending.mask = None

        def inner_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # run_with_cache / run_with_hooks call bridge.forward directly (the root pre-hook doesn't
            # fire); the wrapped HF model still receives the attention mask before the embedding runs.
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 2:
                pending.mask = mask

        self.model.register_forward_pre_hook(root_pre_hook, with_kwargs=True)
        inner = getattr(self.model, "original_model", None) if self.is_bridge else None
        if isinstance(inner, nn.Module) and inner is not self.model:
            inner.register_forward_pre_hook(inner_pre_hook, with_kwargs=True)
        embed = getattr(self.model, "embed", None)
        if isinstance(embed, nn.Module):
            embed.register_forward_pre_hook(embed_pre_hook, with_kwargs=True)
        self._first_block_hook = first_block_hook
        self.install_first_block_hook()

    def install_first_block_hook(self) -> None:
        first = "blocks.0.hook_resid_pre"
        if first in self.model.hook_dict:
            self.hook_point(first).add_hook(self._first_block_hook, dir="fwd", is_permanent=True)
