"""A thin, framework-free hook layer: read (or replace) the activation at named sites of a model.

The training code only needs one operation, the same one the adapters' ``Backend`` provides:

    install(site: str, fn: Callable[[Tensor], Tensor | None]) -> remove: Callable[[], None]

``fn`` sees the site's activation tensor ``(batch, seq, d)`` on every forward; a non-``None`` result
replaces it. Anything with that method is a :class:`SiteHooks` (e.g. the TransformerLens adapter's
``TransformerLensBackend``). Two implementations live here so the core needs no adapter:

* :class:`ModuleHooks`: plain ``nn.Module`` forward hooks at module paths (``transformer.h.1``); a
  tuple output (Hugging Face blocks) is read and replaced in its first element;
* :class:`HookDictHooks`: a temporary forward hook on ``model.hook_dict[name]`` (TransformerLens
  ``HookPoint`` names such as ``blocks.1.hook_resid_post``), found by duck typing, so the core never
  imports TransformerLens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ..errors import HookNotFoundError, did_you_mean

Remover = Callable[[], None]
SiteFn = Callable[[Tensor], "Tensor | None"]


@runtime_checkable
class SiteHooks(Protocol):
    """Installs a function on a site's activation; returns how to remove it."""

    def install(self, site: str, fn: SiteFn) -> Remover: ...


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot read an activation tensor from a module output of type {type(output).__name__}")


def _hook_module(module: nn.Module, fn: SiteFn) -> Remover:
    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        new = fn(_first_tensor(output))
        if new is None:
            return None
        if isinstance(output, Tensor):
            return new
        return type(output)((new, *output[1:])) if isinstance(output, tuple) else [new, *output[1:]]

    handle = module.register_forward_hook(hook)
    return handle.remove


class ModuleHooks:
    """Forward hooks on the submodules of a plain ``nn.Module`` (sites are module paths)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def module(self, site: str) -> nn.Module:
        try:
            return self.model.get_submodule(site)
        except AttributeError:
            names = [n for n, _ in self.model.named_modules() if n]
            raise HookNotFoundError(
                f"no module {site!r} in {type(self.model).__name__}.{did_you_mean(site, names)}"
            ) from None

    def install(self, site: str, fn: SiteFn) -> Remover:
        return _hook_module(self.module(site), fn)


class HookDictHooks:
    """Temporary forward hooks on ``model.hook_dict[name]`` (TransformerLens ``HookPoint`` modules)."""

    def __init__(self, model: Any):
        if not hasattr(model, "hook_dict"):
            raise TypeError(f"{type(model).__name__} has no hook_dict; use ModuleHooks for a plain nn.Module")
        self.model = model

    def install(self, site: str, fn: SiteFn) -> Remover:
        hooks = self.model.hook_dict
        if site not in hooks:
            raise HookNotFoundError(f"no hook named {site!r} on this {type(self.model).__name__}.{did_you_mean(site, hooks)}")
        hp = hooks[site]
        return _hook_module(getattr(hp, "_target", hp), fn)


def site_hooks(model: Any, sites: list[str] | None = None) -> SiteHooks:
    """The right :class:`SiteHooks` for ``model``: itself if it already is one, hook names when the model
    has a ``hook_dict`` containing the sites, module paths otherwise."""
    if isinstance(model, SiteHooks) and not isinstance(model, nn.Module):
        return model
    if hasattr(model, "hook_dict") and (sites is None or all(s in model.hook_dict for s in sites)):
        return HookDictHooks(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or an object with install(site, fn), got {type(model).__name__}")
    return ModuleHooks(model)
