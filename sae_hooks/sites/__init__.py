"""The one framework-free site layer: TransformerLens names <-> module paths, ``path:input``, reading and
replacing a module's hidden state, installing and removing hooks. Everything that takes a site (the
adapters, training sources, evaluation, the CLI) goes through here, so every spelling works everywhere.
"""

from . import names
from .hidden import hidden_of, with_hidden
from .names import Family, complete_site, detect_family, join_site, split_site, to_hook_name, to_module_path
from .resolve import HookDictSites, ModuleSites, Remover, SiteFn, SiteHooks, site_hooks

__all__ = [
    "names", "hidden_of", "with_hidden",
    "Family", "complete_site", "detect_family", "join_site", "split_site", "to_hook_name", "to_module_path",
    "HookDictSites", "ModuleSites", "Remover", "SiteFn", "SiteHooks", "site_hooks",
]
