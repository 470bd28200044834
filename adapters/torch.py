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
  :mod:`sae_hooks.hooknames` for the model's family (detected from ``model.config.model_type`` or the
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
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from sae_hooks import hooknames
from sae_hooks.attach import Remover, SAEManager
from sae_hooks.errors import HookNotFoundError, did_you_mean
from sae_hooks.interventions import RECORD_NAMES

from ._binding import BOUND_METHODS, bind, wrap_generation

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
    backend = TorchBackend(module, hook_names)
    manager = SAEManager(backend)
    backend.manager = manager
    bind(module, manager)
    module.__dict__["sae_capture"] = backend.capture
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
    for name in (*BOUND_METHODS, "sae_manager", "sae_capture", "generate"):
        module.__dict__.pop(name, None)


# Reading and replacing the hidden-state element of a module's input / output ------------------------


def hidden_of(value: Any) -> Tensor | None:
    """The hidden-state tensor in a module's output: the tensor, element 0 of a tuple, or field 0."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if isinstance(value, dict) and value:  # transformers ModelOutput
        first = next(iter(value.values()))
        return first if isinstance(first, Tensor) else None
    return None


def with_hidden(value: Any, new: Tensor) -> Any:
    """``value`` with its hidden-state element replaced by ``new`` (other elements untouched)."""
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    key = next(iter(value))
    value[key] = new  # ModelOutput: item assignment keeps attribute access in sync
    return value


class _CacheRecorder:
    """Publishes an SAE's tensors into the active :meth:`TorchBackend.capture` dict, if any."""

    def __init__(self, backend: TorchBackend, prefix: str):
        self.backend = backend
        self.prefix = prefix

    def wants(self, name: str) -> bool:
        return any(c.selects(f"{self.prefix}.{name}") for c in self.backend.captures)

    def __call__(self, name: str, value: Tensor) -> Tensor:
        key = f"{self.prefix}.{name}"
        for capture in self.backend.captures:
            if capture.selects(key):
                capture[key] = value.detach() if capture.detach else value
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


class TorchBackend:
    """A :class:`~sae_hooks.attach.Backend` over ``nn.Module`` forward hooks."""

    def __init__(self, module: nn.Module, hook_names: str | dict[str, str] | None = "auto"):
        self.module = module
        self.manager: SAEManager | None = None
        self.captures: list[SAECache] = []
        self._context_handle: Any = None
        self.modules = dict(module.named_modules())
        self.family: hooknames.Family | None = None
        self.explicit: dict[str, str] = {}
        if isinstance(hook_names, dict):
            self.explicit = {k: self._check_site(v) for k, v in hook_names.items()}
        elif hook_names == "auto":
            model_type = getattr(getattr(module, "config", None), "model_type", None)
            self.family = hooknames.detect_family(self.modules, model_type)
        elif isinstance(hook_names, str):
            self.family = hooknames.detect_family(self.modules, hook_names) or hooknames.family(hook_names)
        elif hook_names is not None:
            raise TypeError(f"hook_names must be 'auto', a family name, a dict or None, got {hook_names!r}")
        self._reverse = {v: k for k, v in reversed(list(self.explicit.items()))}

    # Sites ---------------------------------------------------------------------------------------

    def _check_site(self, site: str) -> str:
        path, side = hooknames.split_site(site)
        if path not in self.modules:
            raise HookNotFoundError(
                f"no module {path!r} in this {type(self.module).__name__}.{did_you_mean(path, self.modules)}"
            )
        return hooknames.join_site(path, side)

    def _tl_to_site(self, name: str) -> str | None:
        if name in self.explicit:
            return self.explicit[name]
        if self.family is not None:
            try:
                path, side = hooknames.to_module_path(name, self.family)
            except HookNotFoundError:
                return None
            if path in self.modules:
                return hooknames.join_site(path, side)
        return None

    def _site_to_tl(self, site: str) -> str | None:
        if site in self._reverse:
            return self._reverse[site]
        if self.family is not None:
            return hooknames.to_hook_name(site, self.family)
        return None

    def resolve(self, name: str) -> str:
        """Canonical site name: the TransformerLens name when there is one, else ``path[:input]``."""
        if not isinstance(name, str):
            raise TypeError(f"sites are strings (module paths or hook names), got {type(name).__name__}")
        if self._tl_to_site(name) is not None:
            return name
        path, _, side = name.partition(":")
        if path not in self.modules:  # the tree may have changed since attach
            self.modules = dict(self.module.named_modules())
        if path in self.modules and side in ("", "input", "output"):
            site = hooknames.join_site(path, side or "output")
            return self._site_to_tl(site) or site
        candidates = list(self.modules) + list(self.explicit)
        if self.family is not None:
            candidates += hooknames.hook_names(self.family, _n_layers(self.modules, self.family))
        hint = "" if self.family or self.explicit else " (no TransformerLens names: the model family is unknown; pass hook_names=)"
        raise HookNotFoundError(
            f"no module or hook named {name!r} on this {type(self.module).__name__}{hint}."
            f"{did_you_mean(name, candidates)}"
        )

    def module_site(self, site: str) -> tuple[nn.Module, str, str]:
        """``(module, path, side)`` of a canonical site name."""
        spec = self._tl_to_site(site) or site
        path, side = hooknames.split_site(spec)
        return self.modules[path], path, side

    def site_width(self, site: str) -> int | None:
        module, _, side = self.module_site(site)
        if isinstance(module, nn.Linear):
            return module.out_features if side == "output" else module.in_features
        if isinstance(module, nn.Embedding) and side == "output":
            return module.embedding_dim
        if isinstance(module, nn.LayerNorm) and module.normalized_shape:
            return module.normalized_shape[-1]
        cfg = getattr(self.module, "config", None)
        width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        tl = site if self._tl_to_site(site) else None
        if width and tl and tl.rsplit(".", 1)[-1] in (
            "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_embed",
            "hook_pos_embed", "hook_normalized",
        ):
            return int(width)
        return None

    def install(self, site: str, fn: Callable[[Tensor], Tensor | None]) -> Remover:
        module, path, side = self.module_site(site)
        if side == "output":

            def output_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
                hidden = hidden_of(output)
                if hidden is None:
                    raise HookNotFoundError(f"module {path!r} returned {type(output).__name__}, which holds no tensor")
                new = fn(hidden)
                return None if new is None else with_hidden(output, new)

            handle = module.register_forward_hook(output_hook)
        else:

            def input_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args and isinstance(args[0], Tensor):
                    new = fn(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                if isinstance(kwargs.get("hidden_states"), Tensor):
                    new = fn(kwargs["hidden_states"])
                    return None if new is None else (args, {**kwargs, "hidden_states": new})
                raise HookNotFoundError(f"module {path!r} got no tensor input (first argument or hidden_states=)")

            handle = module.register_forward_pre_hook(input_hook, with_kwargs=True)
        return handle.remove

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


def _n_layers(modules: dict[str, nn.Module], fam: hooknames.Family) -> int:
    layers = modules.get(fam.layers)
    return len(layers) if isinstance(layers, (nn.ModuleList, nn.Sequential)) else 1


__all__ = ["attach", "detach", "TorchBackend", "SAECache", "hidden_of", "with_hidden", "RECORD_NAMES"]
