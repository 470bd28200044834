"""Plain-PyTorch adapter: ``model.add_sae`` on any ``nn.Module`` (e.g. a Hugging Face ``GPT2LMHeadModel``).

>>> from sae_hooks.adapters.torch import attach
>>> model = attach(hf_model)                    # the same object, now with add_sae & co.
>>> att = model.add_sae(sae, "transformer.h.3", error_term=True)
>>> with model.sae_capture() as cache:          # opt-in recording of the SAEs' tensors
...     logits = model(input_ids, attention_mask=mask).logits
>>> cache["blocks.3.hook_resid_post.hook_sae_acts_post"]   # (batch, pos, d_sae)

**Sites.** A site is either

* a module path: ``"transformer.h.3"`` is that module's *output* (for a module returning a tuple, as
  Hugging Face decoder layers may, only the hidden-state element ``[0]`` is read and replaced);
  ``"transformer.h.3:input"`` is its *input* (first positional argument, else ``hidden_states=``);
  ``":output"`` may be written explicitly;
* or a TransformerLens hook name (``"blocks.3.hook_resid_post"``), translated with
  :mod:`sae_hooks.sites.names` for the model's family (detected from ``model.config.model_type`` or the
  module tree), or through the ``hook_names`` dict given to :func:`attach`.

Both spellings of one tensor are the same site: when a module site has a TransformerLens name, that
name is its canonical name, so recorded tensors are keyed ``"{hook_name}.hook_sae_acts_post"`` whichever
spelling was attached (the same keys as the TransformerLens adapter). Sites without a TL name keep the
module spelling (``"transformer.h.3.attn.c_attn.hook_sae_acts_post"``).

**Recording** is opt-in: inside ``with model.sae_capture(names) as cache`` each forward pass stores the
selected tensors (all by default; a later forward overwrites an earlier one). Outside it nothing is
recorded and TopK latents are never densified.

**Positions.** The token ids and ``attention_mask`` of the root module's forward call (keyword or first
positional argument) feed position and token filters, so with left padding position 0 is the first real
token. ``model.generate`` is wrapped so that positions stay absolute across KV-cached steps.

Every hook is removed by ``remove_sae`` / ``reset_saes`` / leaving ``model.saes(...)``, also on an
exception; :func:`detach` removes the adapter itself.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import fnmatch
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sae_hooks.errors import HookNotFoundError, SAEHooksError, did_you_mean
from sae_hooks.intervene import RECORD_NAMES, Remover, SAEManager
from sae_hooks.sites import ModuleSites

from ._binding import OWN_KEYS, bind, wrap_generation
from ._foreign import convert_foreign

def attach(module: nn.Module, hook_names: str | dict[str, str] | None = "auto") -> nn.Module:
    """Give ``module`` the SAE API (``add_sae``, ``remove_sae``, ``reset_saes``, ``saes``,
    ``sae_capture``); return it. Idempotent.

    Args:
        module: any ``nn.Module``; its forward hooks do the work.
        hook_names: how TransformerLens names are understood: ``"auto"`` (detect the family from
            ``module.config.model_type`` / the module tree; no TL names if unknown), a family name
            (``"gpt2"``, ``"llama"``, ...), a dict ``{tl_name: module_site}`` for a custom model, or
            ``None`` (module paths only).
    """
    if "sae_manager" in module.__dict__:
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"attach expects an nn.Module, got {type(module).__name__}")
    if module.__dict__.get("_sae_hooks_nnsight"):
        raise SAEHooksError(
            "this module is wrapped by an nnsight model that already has the nnsight adapter attached; "
            "attach one adapter only (use the nnsight model's add_sae)"
        )
    backend = TorchBackend(module, hook_names)
    manager = SAEManager(backend, convert_foreign)
    backend.manager = manager
    bind(module, manager, functools.partial(_deepcopy_attached, module))
    module.__dict__["sae_capture"] = backend.capture
    if not hasattr(module, "run_with_cache"):
        module.__dict__["run_with_cache"] = backend.run_with_cache
    wrap_generation(module, manager)
    backend.install_context_hook()
    return module


def detach(module: nn.Module) -> None:
    """Remove every SAE, the adapter's context hook and the bound methods from ``module``."""
    manager = module.__dict__.get("sae_manager")
    if manager is None:
        return
    manager.reset_saes()
    manager.backend.remove_context_hook()
    for name in OWN_KEYS:
        if name == "run_with_cache" and module.__dict__.get(name) != manager.backend.run_with_cache:
            continue
        module.__dict__.pop(name, None)


def _deepcopy_attached(module: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of an attached module: a plain deep copy of the model (without the adapter's
    hooks), attached anew, with the same SAEs (shared, not copied) at the same sites, same options and
    copies of the edits. Edits on one no longer move the other."""
    manager: SAEManager = module.__dict__["sae_manager"]
    backend: TorchBackend = manager.backend
    ours = {k: module.__dict__.pop(k) for k in OWN_KEYS if k in module.__dict__}
    try:
        clone = copy.deepcopy(module, memo)
    finally:
        module.__dict__.update(ours)
    ids = backend.hook_ids()
    for sub in clone.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks, sub._forward_hooks_with_kwargs,
                      sub._forward_pre_hooks_with_kwargs, sub._forward_hooks_always_called):
            for i in ids:
                hooks.pop(i, None)
    attach(clone, backend.hook_names_arg)
    for att in manager.attachments:
        first = att.interventions[0]
        new = clone.sae_manager._add(
            att.sae, att.sites, site_out=att.sites_out[0] if att.sites_out else None, name=att.name,
            splice=[s for s, i in zip(att.sites, att.interventions) if i.splice], error_term=first.error_term,
            detach_error=first.detach_error, skip_positions=first.skip_positions, skip_tokens=first.skip_tokens,
            replace=False,
        )
        new.edits.extend(copy.deepcopy(att.edits, memo))
    return clone


class _CacheRecorder:
    """Publishes an SAE's tensors into the active :meth:`TorchBackend.capture` dict, if any."""

    def __init__(self, backend: TorchBackend, prefix: str):
        self.backend = backend
        self.prefix = prefix

    def wants(self, name: str) -> bool:
        return any(c.selects(f"{self.prefix}.{name}") for c in self.backend.captures)

    def __call__(self, name: str, value: Tensor) -> Tensor:
        key = f"{self.prefix}.{name}"
        manager = self.backend.manager
        # A KV-cached generation step feeds only the new tokens: append them along the position axis,
        # so the cache holds every step (a forward from position 0 starts afresh).
        stepping = manager is not None and manager._generating and manager.context.position_offset > 0
        if (torch.is_grad_enabled() and value.is_floating_point() and not value.requires_grad
                and any(not c.detach and c.selects(key) for c in self.backend.captures)):
            # Recorded for gradients but kept out of the graph (the detached error term): record a leaf that
            # requires grad (same values) and continue the forward from it, so its gradient can be taken.
            value = value.detach().requires_grad_(True)
        for capture in self.backend.captures:
            if capture.selects(key):
                new = value.detach() if capture.detach else value
                old = dict.get(capture, key)
                if stepping and old is not None and old.dim() == new.dim() >= 2 and old.shape[0] == new.shape[0]:
                    new = torch.cat([old, new], dim=1)
                capture[key] = new
        return value


class SAECache(dict):
    """``{"{site}.hook_sae_acts_post": tensor, ...}`` filled by forward passes inside ``sae_capture``.

    A missing key raises :class:`~sae_hooks.errors.HookNotFoundError` listing close matches.
    """

    def __init__(self, names: Callable[[str], bool], detach: bool):
        super().__init__()
        self.selects = names
        self.detach = detach

    def __missing__(self, key: str) -> Tensor:
        raise HookNotFoundError(
            f"nothing recorded as {key!r}.{did_you_mean(str(key), self.keys())} Recorded: {sorted(self)}"
        )


def _name_filter(names: str | Iterable[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if names is None:
        return lambda key: True
    if callable(names):
        return names
    patterns = [names] if isinstance(names, str) else list(names)
    return lambda key: any(key == p or fnmatch.fnmatchcase(key, p) for p in patterns)


class TorchBackend(ModuleSites):
    """A :class:`~sae_hooks.intervene.Backend` over ``nn.Module`` forward hooks; sites are resolved,
    measured and hooked by :class:`~sae_hooks.sites.ModuleSites`."""

    def __init__(self, module: nn.Module, hook_names: str | dict[str, str] | None = "auto"):
        super().__init__(module, hook_names)
        self.hook_names_arg = hook_names
        self.manager: SAEManager | None = None
        self._captures = threading.local()  # a capture records the forward passes of the thread that opened it
        self._context_handle: Any = None

    @property
    def captures(self) -> list[SAECache]:
        """The captures open in this thread (a forward in another thread must not write into them)."""
        if not hasattr(self._captures, "open"):
            self._captures.open = []
        return self._captures.open

    def recorder(self, prefix: str) -> tuple[_CacheRecorder, Remover]:
        return _CacheRecorder(self, prefix), lambda: None

    # Capture -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(
        self, names: str | Iterable[str] | Callable[[str], bool] | None = None, *, detach: bool = True
    ) -> Iterator[SAECache]:
        """Record the attached SAEs' tensors during the ``with`` block.

        Args:
            names: which keys to record: ``None`` (all), a key, glob patterns
                (``"*.hook_sae_acts_post"``) or a predicate on the key.
            detach: store detached tensors (``False`` keeps them in the autograd graph).
        Yields:
            An :class:`SAECache`; keys are ``"{site}.{record}"`` with record one of
            ``hook_sae_input``, ``hook_sae_acts_post`` (dense latents), ``hook_sae_recons``,
            ``hook_sae_error``, ``hook_sae_output``.
        """
        cache = SAECache(_name_filter(names), detach)
        self.captures.append(cache)
        try:
            yield cache
        finally:
            self.captures.remove(cache)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def hook_ids(self) -> set[int]:
        """Ids of every torch hook this adapter registered (the context hook and the SAEs' hooks)."""
        removers = [r for att in self.manager.attachments for r in att._removers] if self.manager else []
        handles = [getattr(r, "__self__", None) for r in removers] + [self._context_handle]
        return {h.id for h in handles if isinstance(h, RemovableHandle)}

    def run_with_cache(
        self, *args: Any, names_filter: str | Iterable[str] | Callable[[str], bool] | None = None,
        detach: bool = True, **kwargs: Any,
    ) -> tuple[Any, SAECache]:
        """``(output, cache)``: one forward pass with the attached SAEs' tensors recorded (TransformerLens's
        ``run_with_cache`` for the SAE tensors). For generation, ``with model.sae_capture() as cache:
        model.generate(...)`` keeps every step."""
        with self.capture(names_filter, detach=detach) as cache:
            out = self.forward(*args, **kwargs)
        return out, cache

    # Forward context -----------------------------------------------------------------------------

    def install_context_hook(self, root: nn.Module | None = None) -> None:
        manager = self.manager
        assert manager is not None

        def root_pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            tokens = kwargs.get("input_ids")
            if tokens is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
                tokens = args[0]
            mask = kwargs.get("attention_mask")
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                mask = None
            if isinstance(tokens, Tensor) and tokens.dim() == 2:
                manager.begin_forward(tokens, tokens.shape[-1], mask)
                return
            embeds = kwargs.get("inputs_embeds")
            if isinstance(embeds, Tensor) and embeds.dim() == 3:
                manager.begin_forward(None, embeds.shape[1], mask)

        self._context_handle = (root or self.module).register_forward_pre_hook(root_pre_hook, with_kwargs=True)

    def remove_context_hook(self) -> None:
        if self._context_handle is not None:
            self._context_handle.remove()
            self._context_handle = None

__all__ = ["attach", "detach", "TorchBackend", "SAECache", "RECORD_NAMES"]
