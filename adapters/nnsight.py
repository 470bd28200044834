"""nnsight 0.8 adapter: ``model.add_sae`` on an ``NNsight`` / ``LanguageModel`` / ``TransformersModel``.

>>> from sae_hooks.adapters.nnsight import attach
>>> model = attach(LanguageModel(hf_model, tokenizer=tok))   # the same envoy, now with add_sae & co.
>>> att = model.add_sae(sae, "blocks.0.hook_resid_post", error_term=True)
>>> with model.trace(tokens):
...     taps = model.sae_taps["blocks.0.hook_resid_post"]
...     latents = taps.hook_sae_acts_post.output.save()        # read the SAE latents (batch, pos, d_sae)
...     taps.hook_sae_acts_post.output[:, :, 7] = 0            # edit them: the forward pass sees the change
...     logits = model.output.logits.save()

How it works (nnsight 0.8.1): nnsight installs a *controller* as each wrapped module's ``forward``;
``nn.Module.__call__`` still runs ordinary PyTorch forward hooks around it, inside traces as well as
outside. So this adapter is the torch adapter (:mod:`sae_hooks.adapters.torch`) applied to the underlying
module ``model._module``: SAEs run in plain forward hooks, and apply in a plain call (``model(...)``,
``model._module(...)``), inside ``with model.trace(...)`` and in ``model.generate(...)`` (direct call or
``with`` block; the module's ``generate`` is wrapped so positions stay absolute across KV-cached steps).

Reading and editing SAE tensors inside a trace: each attachment gets a small tree of identity modules,
wrapped as a standalone nnsight ``Envoy`` (like nnsight's own ``model.generator``), reachable as
``model.sae_taps[name]`` where ``name`` is the attachment's name (the site's canonical name: its
TransformerLens name when it has one; any spelling of the site is accepted). Its children
``hook_sae_input``, ``hook_sae_acts_post`` (dense latents), ``hook_sae_recons``, ``hook_sae_error`` and
``hook_sae_output`` expose ``.output`` to read (``.save()``), assign (``= new``) or edit in place
(``[...] = v``). An edit of ``hook_sae_acts_post`` is decoded and added to the spliced output, exactly as
``att.ablate``/``att.clamp`` would do it. The taps are called only while a trace is running, so outside
one TopK latents are never densified.

Order inside the hooked module: nnsight serves ``model.transformer.h[0].output`` *before* the SAE runs
(it is the activation the SAE reads); the value after the SAE is ``taps.hook_sae_output.output``. Request
values in forward order, as nnsight requires: the site's ``.output``, then the taps in the order
input, acts_post, recons, error, output, then later modules.

Gradients: inside ``with metric.backward():`` in a trace, ``.grad`` of a tap's ``.output`` (taken before
the backward block) is the gradient reaching it, in reverse forward order (nnsight's rule): with autograd
on, the forward pass continues from the served tensor, and the detached error term is served as a leaf
that requires grad.

``model.sae_capture()`` (the torch adapter's opt-in cache) works too, in and out of traces.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sae_hooks.errors import HookNotFoundError, SAEHooksError, did_you_mean
from sae_hooks.intervene import RECORD_NAMES, Remover, SAEManager

from ._binding import OWN_KEYS, bind, wrap_generation
from ._foreign import convert_foreign
from .torch import TorchBackend, _CacheRecorder

try:  # nnsight is required by this adapter only.
    from nnsight import Envoy
except ImportError as e:  # pragma: no cover - exercised only without nnsight installed
    raise ImportError("sae_hooks.adapters.nnsight needs nnsight: pip install 'sae-hooks[nnsight]'") from e


def attach(model: Any, hook_names: str | dict[str, str] | None = "auto") -> Any:
    """Give an nnsight model the SAE API (``add_sae``, ``remove_sae``, ``reset_saes``, ``saes``,
    ``sae_capture``, ``sae_taps``); return it. Idempotent.

    ``hook_names`` is as in :func:`sae_hooks.adapters.torch.attach`.
    """
    if "sae_manager" in model.__dict__:
        return model
    module = getattr(model, "_module", None)
    if not isinstance(model, Envoy) or not isinstance(module, nn.Module):
        raise TypeError(
            f"{type(model).__name__} is not an nnsight model (an Envoy wrapping an nn.Module); "
            "use sae_hooks.adapters.torch.attach for a plain nn.Module"
        )
    if "sae_manager" in module.__dict__:
        raise SAEHooksError(
            "the module under this nnsight model already has the torch adapter attached; attach one adapter only"
        )
    module.__dict__["_sae_hooks_nnsight"] = True  # the torch adapter refuses this module now
    backend = NNsightBackend(model, hook_names)
    manager = SAEManager(backend, convert_foreign)
    backend.manager = manager
    bind(model, manager)
    model.__dict__["sae_capture"] = backend.capture
    model.__dict__["sae_taps"] = backend.taps
    wrap_generation(module, manager)  # HF generate, called by nnsight's generate and by direct calls
    backend.install_context_hook()
    return model


def detach(model: Any) -> None:
    """Remove every SAE, the context hook, the generate wrapper and the bound API."""
    manager = model.__dict__.get("sae_manager")
    if manager is None:
        return
    manager.reset_saes()
    manager.backend.remove_context_hook()
    model._module.__dict__.pop("generate", None)
    model._module.__dict__.pop("_sae_hooks_nnsight", None)
    for name in OWN_KEYS:
        model.__dict__.pop(name, None)


class SAETaps(nn.Module):
    """Identity modules an attachment passes its tensors through, so nnsight can serve them."""

    def __init__(self) -> None:
        super().__init__()
        for name in RECORD_NAMES:
            self.add_module(name, _Identity())


class _Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class TapsDict(dict):
    """``{attachment name: Envoy}``; lookups accept any spelling of a site (resolved by the backend)."""

    def __init__(self, backend: NNsightBackend):
        super().__init__()
        self.backend = backend

    def __missing__(self, key: str) -> Envoy:
        try:
            resolved = self.backend.resolve(key)
        except HookNotFoundError:
            resolved = None
        if resolved is not None and dict.__contains__(self, resolved):
            return dict.__getitem__(self, resolved)
        raise HookNotFoundError(
            f"no SAE attached as {key!r}.{did_you_mean(str(key), self.keys())} Attached: {sorted(self)}"
        )


class _TapRecorder:
    """Passes an SAE's tensors through its taps while a trace runs, and into ``sae_capture`` caches."""

    def __init__(self, backend: NNsightBackend, prefix: str, taps: SAETaps, envoy: Envoy):
        self.backend = backend
        self.cache = _CacheRecorder(backend, prefix)
        self.taps = taps
        self.paths = {name: getattr(envoy, name).path for name in RECORD_NAMES}

    def wants(self, name: str) -> bool:
        return self.backend.tracing() or self.cache.wants(name)

    def __call__(self, name: str, value: Tensor) -> Tensor:
        if self.backend.tracing():
            tap = getattr(self.taps, name)
            if self.backend.awaited(self.paths[name]):
                # A worker may edit the served tensor in place: hand it a copy, and report a change
                # by returning a new object (the intervention decodes only what changed).
                grad = torch.is_grad_enabled() and value.is_floating_point()
                if grad and not value.requires_grad:
                    # A tensor kept out of the graph (the detached error term): serve it as a leaf that
                    # requires grad, so ``.grad`` in ``with metric.backward():`` reads the gradient that
                    # reaches it (nothing flows on into the model's own activation).
                    served = value.detach().clone().requires_grad_(True)
                else:
                    served = value.clone()
                out = tap(served)
                if grad or not (out is served and torch.equal(served, value)):
                    # With autograd on, the forward pass continues from the served tensor (same values),
                    # so a backward from the model's output reaches it and its ``.grad`` is served.
                    value = out
            else:
                value = tap(value)
        return self.cache(name, value) if self.cache.wants(name) else value


class NNsightBackend(TorchBackend):
    """The torch backend on ``model._module``, with recorded tensors also served as nnsight envoys."""

    def __init__(self, model: Any, hook_names: str | dict[str, str] | None = "auto"):
        super().__init__(model._module, hook_names)
        self.envoy = model
        self.taps = TapsDict(self)

    def tracing(self) -> bool:
        interleaver = self.envoy.interleaver
        return bool(interleaver.interleaving and interleaver.busy)

    def awaited(self, path: str) -> bool:
        """Whether a trace worker or cache is waiting on this tap's value."""
        interleaver = self.envoy.interleaver
        keys = (f"{path}.output", f"{path}.input")
        return any(k in interleaver.parked or k in interleaver.observers for k in keys)

    def recorder(self, prefix: str) -> tuple[_TapRecorder, Remover]:
        taps = SAETaps()
        envoy = Envoy(taps, path=f"{self.envoy.path}.sae_taps.{prefix}", interleaver=self.envoy.interleaver,
                      parent=self.envoy)
        self.taps[prefix] = envoy

        def unpublish() -> None:
            if dict.get(self.taps, prefix) is envoy:
                del self.taps[prefix]

        return _TapRecorder(self, prefix, taps, envoy), unpublish


__all__ = ["attach", "detach", "NNsightBackend", "SAETaps"]
