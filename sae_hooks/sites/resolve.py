"""Find a site on a model by any spelling and hook it: the one site layer every part of sae-hooks uses.

A *site* is a place in a model where an activation can be read or replaced. It may be written as

* a TransformerLens hook name: ``"blocks.3.hook_resid_post"``. On a TransformerLens model (anything
  with a ``hook_dict``) it is that ``HookPoint``; on a plain ``nn.Module`` (a Hugging Face model) it is
  translated to a module path with :mod:`sae_hooks.sites.names` for the model's family;
* a module path: ``"transformer.h.3"`` is that module's *output* (its hidden-state element);
* ``"transformer.h.3:input"``: the module's *input* (first positional argument, else ``hidden_states=``);
* ``"transformer.h.3.ln_2:normalized"``: a norm module's pre-affine normalised value (TransformerLens's
  ``hook_normalized``: read inside the norm, recomputed from its input; a replacement goes through the
  norm's scale and shift).

Every spelling of one tensor resolves to one *canonical* name: its TransformerLens name when it has one,
else ``path`` / ``path:input``. Misspelled sites raise :class:`~sae_hooks.errors.HookNotFoundError`
with close matches.

Two implementations share one interface (``resolve``, ``site_width``, ``install``):
:class:`ModuleSites` over ``nn.Module`` forward hooks and :class:`HookDictSites` over TransformerLens
``HookPoint``\\ s (found by duck typing: the core never imports TransformerLens). :func:`site_hooks`
picks the right one for a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import HookNotFoundError, did_you_mean
from . import names as hooknames
from .hidden import hidden_of, with_hidden

Remover = Callable[[], None]
#: A function run on a site's activation in every forward pass; a non-``None`` result replaces it.
SiteFn = Callable[[Tensor], "Tensor | None"]


@runtime_checkable
class SiteHooks(Protocol):
    """Anything that installs a function on a site's activation and returns how to remove it."""

    def install(self, site: str, fn: SiteFn) -> Remover: ...


def _n_layers(modules: dict[str, nn.Module], fam: hooknames.Family) -> int:
    layers = modules.get(fam.layers)
    return len(layers) if isinstance(layers, (nn.ModuleList, nn.Sequential)) else 1


def hook_module_output(module: nn.Module, fn: SiteFn, path: str = "") -> Remover:
    """Run ``fn`` on ``module``'s output hidden state in every forward; a non-``None`` result replaces it."""

    def output_hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        hidden = hidden_of(output)
        if hidden is None:
            raise HookNotFoundError(f"module {path!r} returned {type(output).__name__}, which holds no tensor")
        new = fn(hidden)
        return None if new is None else with_hidden(output, new)

    return module.register_forward_hook(output_hook).remove


def hook_module_input(module: nn.Module, fn: SiteFn, path: str = "") -> Remover:
    """Run ``fn`` on ``module``'s input (first positional argument, else ``hidden_states=``)."""

    def input_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args and isinstance(args[0], Tensor):
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        if isinstance(kwargs.get("hidden_states"), Tensor):
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        raise HookNotFoundError(f"module {path!r} got no tensor input (first argument or hidden_states=)")

    return module.register_forward_pre_hook(input_hook, with_kwargs=True).remove


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "Norm" in type(module).__name__


def _is_rms(module: nn.Module) -> bool:
    return isinstance(module, nn.RMSNorm) or "RMSNorm" in type(module).__name__


def _norm_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        return int(weight.shape[-1])
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if isinstance(shape, (tuple, list)) and shape else None


def _is_token_norm(module: nn.Module) -> bool:
    """A norm over the last (feature) axis, as transformers use (not GroupNorm/BatchNorm, channel-first)."""
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("RMSNorm", "LayerNorm"))


def config_widths(cfg: Any) -> dict[str, int]:
    """``{"d_model", "d_mlp", "d_attn", "d_vocab"}`` (those known) from a Hugging Face or TransformerLens
    config, for :func:`width_of_hook`."""
    if cfg is None:
        return {}
    text = getattr(cfg, "get_text_config", None)
    if callable(text):  # multimodal configs keep the language model's sizes in text_config
        try:
            cfg = text()
        except Exception:  # noqa: BLE001 - a config without a text part is its own text config
            pass

    def first(*names: str) -> int | None:
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    d_model = first("d_model", "hidden_size", "n_embd")
    d_mlp = first("d_mlp", "intermediate_size", "n_inner") or (4 * d_model if d_model and hasattr(cfg, "n_inner") else None)
    heads = first("n_heads", "num_attention_heads", "n_head")
    d_head = first("d_head", "head_dim") or (d_model // heads if d_model and heads and d_model % heads == 0 else None)
    out = {"d_model": d_model, "d_mlp": d_mlp, "d_attn": heads * d_head if heads and d_head else None,
           "d_vocab": first("d_vocab", "vocab_size")}
    return {k: v for k, v in out.items() if v}


# The width of every TransformerLens name whose width is fixed by the config (TL 2/3 and TL4 spellings). TL4's
# ``hook_in`` / ``hook_out`` are listed by component: other components' (rotary tables, token ids, per-head
# projections) hold something else.
_HOOK_WIDTHS = [
    (re.compile(r"^blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_(attn|mlp)_out|hook_mlp_in)$|^hook_(pos_)?embed$"
                r"|^(blocks\.\d+\.ln\w*|ln_final)\.hook_normalized$"
                r"|^(blocks\.\d+(\.(attn|mlp|ln\w*))?|ln_final)\.hook_(in|out)$|^(embed|pos_embed)\.hook_out$"
                r"|^unembed\.hook_in$|\.attn\.(q|k|v)\.hook_in$|\.attn\.o\.hook_out$"
                r"|\.mlp\.(in|gate)\.hook_in$|\.mlp\.out\.hook_out$"), "d_model"),
    (re.compile(r"\.mlp\.(hook_pre|hook_pre_linear|hook_post|(in|gate)\.hook_out|out\.hook_in)$"), "d_mlp"),
    (re.compile(r"\.attn\.hook_z$"), "d_attn"),
    (re.compile(r"^(hook_unembed|unembed\.hook_out)$"), "d_vocab"),
]


def width_of_hook(name: str, widths: dict[str, int]) -> int | None:
    """The last-axis width of the tensor at TransformerLens hook ``name`` (``attn.hook_z`` flattened to
    ``n_heads * d_head``), from :func:`config_widths`; ``None`` when the name's width is not fixed."""
    for pattern, key in _HOOK_WIDTHS:
        if pattern.search(name):
            return widths.get(key)
    return None


def _norm_eps(module: nn.Module) -> float:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        eps = getattr(module, attr, None)
        if isinstance(eps, (int, float)):
            return float(eps)
    return 1e-5


def normalized_of(module: nn.Module, x: Tensor) -> Tensor:
    """The pre-affine normalised input of a norm module, in float32 (as TransformerLens computes
    ``hook_normalized``): ``(x - mean) / sqrt(var + eps)`` for LayerNorm, ``x / sqrt(mean(x²) + eps)``
    for RMSNorm. ``x``: ``(..., d)``."""
    xf = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    if not _is_rms(module):
        xf = xf - xf.mean(-1, keepdim=True)
    return xf / (xf.pow(2).mean(-1, keepdim=True) + _norm_eps(module)).sqrt()


def norm_affine(module: nn.Module, normalized: Tensor, dtype: torch.dtype) -> Tensor:
    """Apply a norm module's scale (``1 + weight`` for Gemma's RMSNorm) and shift to a normalised
    tensor, in float32, then cast to ``dtype``: the norm's output for that normalised value."""
    weight = getattr(module, "weight", None)
    out = normalized
    if isinstance(weight, Tensor):
        offset = _is_rms(module) and type(module).__name__.startswith("Gemma")
        out = out * ((1.0 + weight.float()) if offset else weight.float())
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and not _is_rms(module):
        out = out + bias.float()
    return out.to(dtype)


def hook_norm_normalized(module: nn.Module, fn: SiteFn, path: str = "") -> Remover:
    """Run ``fn`` on a norm module's pre-affine normalised value (recomputed from its input, float32);
    a non-``None`` result replaces it: the norm's output becomes that value times its scale plus its shift."""
    if not _is_norm(module):
        raise HookNotFoundError(f"{path!r} is a {type(module).__name__}, not a norm: it has no ':normalized' side")

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
        if not isinstance(x, Tensor):
            raise HookNotFoundError(f"norm {path!r} got no tensor input")
        new = fn(normalized_of(mod, x))
        if new is None:
            return None
        hidden = hidden_of(output)
        return with_hidden(output, norm_affine(mod, new, hidden.dtype if hidden is not None else x.dtype))

    return module.register_forward_hook(hook, with_kwargs=True).remove


class ModuleSites:
    """Sites of a plain ``nn.Module``: module paths, ``path:input``, and TransformerLens names.

    Args:
        module: the model.
        hook_names: how TransformerLens names are understood: ``"auto"`` (detect the family from
            ``module.config.model_type`` / the module tree; no TL names if unknown), a family name
            (``"gpt2"``, ``"llama"``, ...), a dict ``{tl_name: module_site}`` for a custom model, or
            ``None`` (module paths only).
    """

    def __init__(self, module: nn.Module, hook_names: str | dict[str, str] | None = "auto"):
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        self.module = module
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
        if self.family is not None:
            self.family = hooknames.for_config(self.family, getattr(module, "config", None))
        self._reverse = {v: k for k, v in reversed(list(self.explicit.items()))}

    def device(self) -> torch.device | None:
        """Where the model's parameters live (``None`` when it has none)."""
        param = next(self.module.parameters(), None)
        return param.device if param is not None else None

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

    def is_hook_name(self, site: str) -> bool:
        """Whether ``site`` is a TransformerLens name this model translates."""
        return self._tl_to_site(site) is not None

    def candidates(self) -> list[str]:
        """Every spelling this model accepts (for close-match hints)."""
        names = list(self.modules) + list(self.explicit)
        if self.family is not None:
            names += hooknames.hook_names(self.family, _n_layers(self.modules, self.family))
        return names

    def resolve(self, name: str) -> str:
        """Canonical site name: the TransformerLens name when there is one, else ``path[:input]``."""
        if not isinstance(name, str):
            raise TypeError(f"sites are strings (module paths or hook names), got {type(name).__name__}")
        site = self._tl_to_site(name)
        if site is not None:  # aliases (TL4 "blocks.3.hook_in") resolve to the first name of that tensor
            return self._site_to_tl(site) or name
        path, _, side = name.partition(":")
        if path not in self.modules:  # the tree may have changed since we listed it
            self.modules = dict(self.module.named_modules())
        if side == "normalized" and path in self.modules and not _is_norm(self.modules[path]):
            raise HookNotFoundError(f"{name!r}: only norm modules have a ':normalized' side; "
                                    f"{path!r} is a {type(self.modules[path]).__name__}")
        if path in self.modules and side in ("", *hooknames.SIDES):
            site = hooknames.join_site(path, side or "output")
            return self._site_to_tl(site) or site
        hint = "" if self.family or self.explicit else (
            " (no TransformerLens names: the model family is unknown; pass hook_names=)"
        )
        raise HookNotFoundError(
            f"no module or hook named {name!r} on this {type(self.module).__name__}{hint}."
            f"{did_you_mean(name, self.candidates())}"
        )

    def module_site(self, site: str) -> tuple[nn.Module, str, str]:
        """``(module, path, side)`` of a site (any spelling)."""
        canonical = self.resolve(site)
        path, side = hooknames.split_site(self._tl_to_site(canonical) or canonical)
        return self.modules[path], path, side

    def site_width(self, site: str) -> int | None:
        """The feature width at ``site`` when known without running the model, else ``None``.

        Known: any side of a Linear, HF ``Conv1D``, embedding (output) or LayerNorm/RMSNorm (from their
        weights), and every TransformerLens name with a fixed width (``d_model``, ``d_mlp``, ``n_heads *
        d_head`` from the model's config). Other module sites (an activation function, a dropout, a whole
        sub-module without a TL name) are measured at the first forward pass instead."""
        canonical = self.resolve(site)
        module, _, side = self.module_site(canonical)
        if isinstance(module, nn.Linear):
            return module.out_features if side == "output" else module.in_features
        weight = getattr(module, "weight", None)
        if isinstance(getattr(module, "nf", None), int) and isinstance(weight, Tensor) and weight.dim() == 2:
            return weight.shape[1] if side == "output" else weight.shape[0]  # HF GPT-2 Conv1D: (in, out)
        if isinstance(module, nn.Embedding):
            return module.embedding_dim if side == "output" else None
        if _is_token_norm(module):  # a norm keeps the width: input, output and normalised value alike
            return _norm_width(module)
        if self._tl_to_site(canonical) is not None:
            return width_of_hook(canonical, config_widths(getattr(self.module, "config", None)))
        return None

    def install(self, site: str, fn: SiteFn) -> Remover:
        """Run ``fn`` on the activation at ``site`` (any spelling) in every forward pass."""
        module, path, side = self.module_site(site)
        if side == "output":
            return hook_module_output(module, fn, path)
        if side == "normalized":
            return hook_norm_normalized(module, fn, path)
        return hook_module_input(module, fn, path)


class HookDictSites:
    """Sites of a TransformerLens model (``HookedTransformer`` or TL4 ``TransformerBridge``).

    TransformerLens names are the model's own ``HookPoint``\\ s. Module paths are accepted too: on a
    bridge, paths of the wrapped Hugging Face model (``transformer.h.3``, ``transformer.h.3:input``)
    are translated to the bridge's hook name when there is one, else hooked on that module; on a
    ``HookedTransformer``, paths of its own module tree (``blocks.3.mlp``).
    """

    def __init__(self, model: Any):
        if not hasattr(model, "hook_dict"):
            raise TypeError(f"{type(model).__name__} has no hook_dict; use ModuleSites for a plain nn.Module")
        self.model = model
        self.is_bridge = hasattr(model, "_hook_registry")
        inner = getattr(model, "original_model", None) if self.is_bridge else model
        self.modules = ModuleSites(inner, "auto" if self.is_bridge else None) if isinstance(inner, nn.Module) else None

    def device(self) -> torch.device | None:
        params = getattr(self.model, "parameters", None)
        param = next(params(), None) if callable(params) else None
        return param.device if param is not None else None

    def hook_point(self, name: str) -> Any:
        hp = self.model.hook_dict[name]
        return getattr(hp, "_target", hp)  # TL4 aliases may be views of the real HookPoint

    def is_hook_point(self, site: str) -> bool:
        return site in self.model.hook_dict

    def resolve(self, name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"sites are strings (hook names or module paths), got {type(name).__name__}")
        hooks = self.model.hook_dict
        if name in hooks:
            return name
        if self.modules is not None:
            try:
                return self.modules.resolve(name)
            except HookNotFoundError:
                pass
        candidates = list(hooks) + (list(self.modules.modules) if self.modules is not None else [])
        raise HookNotFoundError(
            f"no hook or module named {name!r} on this {type(self.model).__name__}.{did_you_mean(name, candidates)}"
        )

    def site_width(self, site: str) -> int | None:
        """The feature width at ``site`` from the model's TransformerLens config (hook points), or from the
        wrapped module's weights / config (module paths); ``None`` when the name's width is not fixed
        (attention scores, per-head ``hook_q``/``k``/``v``, ``hook_scale``)."""
        site = self.resolve(site)
        if not self.is_hook_point(site):
            return self.modules.site_width(site) if self.modules is not None else None
        return width_of_hook(site, config_widths(getattr(self.model, "cfg", None)))

    def install(self, site: str, fn: SiteFn) -> Remover:
        """A temporary forward hook on the site's ``HookPoint`` (or module); returns its remover."""
        site = self.resolve(site)
        if self.is_hook_point(site):
            return hook_module_output(self.hook_point(site), fn, site)
        assert self.modules is not None
        return self.modules.install(site, fn)


def site_hooks(model: Any, sites: Sequence[str] | None = None) -> SiteHooks:
    """The site layer for ``model``, every spelling accepted; ``sites`` are resolved now (early errors).

    ``model`` may be an object with ``install(site, fn)`` already (returned as is), a model given the SAE
    API by an adapter (its backend, so ``hook_names=`` given to the adapter apply), a TransformerLens
    model (:class:`HookDictSites`) or any ``nn.Module`` (:class:`ModuleSites`).
    """
    if isinstance(model, SiteHooks) and not isinstance(model, nn.Module):
        layer: Any = model
    else:
        manager = getattr(model, "__dict__", {}).get("sae_manager")
        if manager is not None and isinstance(manager.backend, SiteHooks):
            layer = manager.backend
        elif hasattr(model, "hook_dict"):
            layer = HookDictSites(model)
        elif isinstance(model, nn.Module):
            layer = ModuleSites(model)
        else:
            raise TypeError(f"expected an nn.Module or an object with install(site, fn), got {type(model).__name__}")
    resolve = getattr(layer, "resolve", None)
    if resolve is not None:
        for s in sites or ():
            resolve(s)
    return layer


__all__ = ["SiteHooks", "SiteFn", "Remover", "ModuleSites", "HookDictSites", "site_hooks",
           "hook_module_output", "hook_module_input"]
