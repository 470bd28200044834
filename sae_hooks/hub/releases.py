"""The release registry, derived at import time from the vendored listings (:mod:`sae_hooks.hub.listings`).

A release is what SAELens calls one (``"gemma-scope-2b-pt-res"``): a Hub repo plus the SAEs listed for it, each with
SAELens's ``id`` and its folder ``path`` in the repo (they differ for ``*-canonical`` and Gemma Scope 2 ``*-all``
releases). ``releases.json`` only holds the rules that turn a listing into a loadable release (SAELens conversion ->
our format, model names -> Hugging Face ids, older names) and the few releases no listing covers, so the registry's
ids, layers and examples cannot drift from the listings: a wrong ``sae_id`` is refused with the closest listed ones,
without a download.

``sae_hooks.load(release, sae_id)`` accepts either the SAELens ``id`` or the repo ``path``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import HubFileNotFoundError, SAEFormatError, close_matches
from .listings import ListedSAE, listings

RELEASES_FILE = Path(__file__).with_name("releases.json")
_NUMERIC = {"layer", "l0"}
_LAYER_RES = (
    re.compile(r"(?:^|/)layer_(\d+)(?:[_/]|$)"),
    re.compile(r"(?:^|/)blocks\.(\d+)\."),
    re.compile(r"^l(\d+)(?:r|m|a|tc)_"),
    re.compile(r"(?:^|/)L(\d+)(?:R|M|A|TC)(?:-|$)"),
    re.compile(r"resid_post_layer_(\d+)"),
    re.compile(r"(?:^|/)layers\.(\d+)(?:\.|$)"),
    re.compile(r"^(\d+)$"),
)
_TL_HOOK = re.compile(r"^blocks\.\d+\.(?:hook_resid_pre|hook_resid_mid|hook_resid_post|hook_mlp_out|hook_attn_out|"
                      r"attn\.hook_z|mlp\.hook_post)$")


class SAEIdNotFoundError(HubFileNotFoundError):
    """An ``sae_id`` that names no SAE of a release or repo (the message suggests the closest valid ones)."""


class UnsupportedReleaseError(SAEFormatError):
    """A listed release whose layout sae_hooks cannot read yet (the message says which layout and why)."""


def layer_of(*texts: str) -> int | None:
    """The layer number in an SAE id or path (``layer_5/...``, ``blocks.5.``, ``l5r_8x``, ``L5R``, ``layers.5``)."""
    for rx in _LAYER_RES:
        for t in texts:
            m = rx.search(t)
            if m:
                return int(m.group(1))
    return None


@dataclass(frozen=True)
class Release:
    name: str
    repo_id: str | None
    format: str | None
    model: str | None
    saes: tuple[ListedSAE, ...] = ()
    conversion: str | None = None
    listing: str = ""
    why: str = ""
    path: str = ""
    hooks: dict[str, str] = field(default_factory=dict)
    n_layers: int | None = None
    n_layers_pattern: int | None = None
    example_id: str = ""
    source: str = "hub"
    verified: str = ""
    aliases: tuple[str, ...] = ()

    # ---- what the listing says

    @property
    def listed(self) -> bool:
        return bool(self.saes)

    @property
    def on_hub(self) -> bool:
        return self.source == "hub" and self.repo_id is not None

    @property
    def supported(self) -> bool:
        return self.format is not None

    @property
    def example(self) -> str:
        return self.saes[0].id if self.saes else self.example_id

    @property
    def layers(self) -> list[int]:
        """Layers of the listed SAEs (empty when the listing gives none, or for an unlisted release)."""
        found = {layer_of(s.id, s.path) for s in self.saes}
        return sorted(x for x in found if x is not None)

    def resolve(self, sae_id: str | None) -> ListedSAE | None:
        """The listed SAE whose SAELens ``id`` or repo ``path`` is ``sae_id``."""
        sid = (sae_id or "").strip("/")
        for s in self.saes:
            if s.id == sid:
                return s
        return next((s for s in self.saes if s.path == sid), None)

    def site(self, sae: ListedSAE) -> tuple[str | None, str | None]:
        """(hook, hook_out) of a listed SAE; ``(None, None)`` when its files say it (SAELens cfg.json, Llama Scope)."""
        layer = layer_of(sae.id, sae.path)
        conv = self.conversion
        if conv in ("gemma_2", "gemma_2_transcoder"):
            from .formats.gemma_scope import gemma1_hooks

            hook, hook_out, _ = gemma1_hooks(f"{self.repo_id}/{sae.path}", layer)
            return hook, hook_out
        if conv == "gemma_3":
            from .formats.gemma_scope import gemma2_hooks

            return gemma2_hooks(sae.path, layer, False)
        if conv == "dictionary_learning_1":
            m = re.match(r"^(blocks\.\d+\.hook_\w+?)__trainer_\d+$", sae.id)
            if m:
                return m.group(1), None
            m = re.match(r"^resid_post_layer_(\d+)_trainer_\d+$", sae.id)
            return (f"blocks.{m.group(1)}.hook_resid_post", None) if m else (None, None)
        if conv == "connor_rob_hook_z" and layer is not None:
            return f"blocks.{layer}.attn.hook_z", None
        if conv is None and _TL_HOOK.match(sae.id):
            return sae.id, None
        return None, None

    # ---- unlisted releases: an sae_id pattern

    def regex(self) -> re.Pattern[str]:
        out, pos = "", 0
        for m in re.finditer(r"\{(\w+)\}", self.path):
            out += re.escape(self.path[pos:m.start()])
            name = m.group(1)
            out += rf"(?P<{name}>\d+)" if name in _NUMERIC else rf"(?P<{name}>[^/]+?)"
            pos = m.end()
        return re.compile(out + re.escape(self.path[pos:]))

    def match(self, sae_id: str | None) -> dict[str, str] | None:
        """The pattern's fields for ``sae_id`` (unlisted releases), or ``None`` when it does not fit."""
        m = self.regex().fullmatch((sae_id or "").strip("/"))
        return m.groupdict() if m else None

    def hooks_for(self, fields: dict[str, str]) -> tuple[str | None, str | None]:
        def fill(t: str | None) -> str | None:
            if t is None:
                return None
            try:
                return t.format(**fields)
            except (KeyError, IndexError):
                return None

        return fill(self.hooks.get("hook")), fill(self.hooks.get("hook_out"))

    def examples(self) -> list[str]:
        """Valid (listed) ids, or for an unlisted release the example with every layer number."""
        if self.saes:
            return [s.id for s in self.saes]
        if not self.example_id:
            return [""] if self.path == "" else []
        out = [self.example_id]
        fields = self.match(self.example_id) or {}
        if "layer" in fields and self.n_layers_pattern:
            out += [self.path.format(**{**fields, "layer": i}) for i in range(self.n_layers_pattern)]
        return list(dict.fromkeys(out))

    def url(self, sae_id: str) -> str | None:
        return self.source.format(path=sae_id) if not self.on_hub and "{path}" in self.source else None

    def row(self) -> dict[str, Any]:
        ex = self.resolve(self.example)
        hooks = dict(zip(("hook", "hook_out"), self.site(ex))) if ex else dict(self.hooks)
        return {"name": self.name, "repo_id": self.repo_id, "format": self.format, "model": self.model,
                "n_saes": len(self.saes) if self.saes else None, "layers": self.layers,
                "example": self.example, "hooks": {k: v for k, v in hooks.items() if v},
                "path": self.path or None, "source": self.source, "listing": self.listing or None,
                "supported": self.supported, "why": self.why or None, "aliases": list(self.aliases)}

    def sae_rows(self) -> list[dict[str, Any]]:
        rows = []
        for s in self.saes:
            hook, hook_out = self.site(s)
            rows.append({"sae_id": s.id, "path": s.path, "layer": layer_of(s.id, s.path), "hook": hook,
                         "hook_out": hook_out, "norm_scaling_factor": s.norm_scaling_factor})
        return rows


@lru_cache(maxsize=1)
def _rules() -> dict[str, Any]:
    return json.loads(RELEASES_FILE.read_text())


@lru_cache(maxsize=1)
def _load_table() -> dict[str, Release]:
    rules = _rules()
    convs, models = rules["conversions"], rules["models"]
    overrides = rules.get("model_overrides", {})
    alias_of: dict[str, list[str]] = {}
    for old, new in rules.get("aliases", {}).items():
        alias_of.setdefault(new, []).append(old)
    out: dict[str, Release] = {}
    for name, lst in listings().items():
        conv = convs.get(str(lst.conversion_func) if lst.conversion_func is not None else "null")
        if conv is None:
            conv = {"format": None, "why": f"SAELens conversion {lst.conversion_func!r} has no loader in sae_hooks"}
        model = overrides.get(name, {}).get("model") or models.get(lst.model or "", lst.model)
        out[name] = Release(name=name, repo_id=lst.repo_id, format=conv["format"], model=model, saes=lst.saes,
                            conversion=lst.conversion_func, listing=lst.source, why=conv.get("why", ""),
                            verified=f"listed in {lst.source}", aliases=tuple(alias_of.get(name, ())))
    for name, r in rules.get("unlisted", {}).items():
        out[name] = Release(name=name, repo_id=r.get("repo_id"), format=r["format"], model=r.get("model"),
                            path=r.get("path", ""), hooks=r.get("hooks", {}), n_layers=r.get("n_layers"),
                            n_layers_pattern=r.get("layers"), example_id=r.get("example", ""),
                            source=r.get("source", "hub"), verified=r.get("verified", ""))
    return out


def releases() -> dict[str, Release]:
    return dict(_load_table())


def get_release(name: str) -> Release | None:
    """The release called ``name`` (SAELens's name, or an older alias of ours)."""
    table = _load_table()
    return table.get(name) or table.get(_rules().get("aliases", {}).get(name, ""))


def list_pretrained(name: str | None = None, *, model: str | None = None) -> list[dict[str, Any]]:
    """The registry, or one release's SAEs, from the vendored listings (no download).

    * ``list_pretrained()``: one row per release (``name``, ``repo_id``, ``format``, ``model``, ``n_saes``,
      ``layers``, ``example``, ``hooks``, ``supported``, ``listing``, ...).
    * ``list_pretrained("gemma-scope-2b-pt-res")``: one row per SAE of that release (``sae_id``, ``path``,
      ``layer``, ``hook``, ``hook_out``, ``norm_scaling_factor``).
    * ``list_pretrained(model="gemma-2-2b")`` (or a first argument that is not a release name): the releases whose
      model name contains it.
    """
    if name is not None:
        rel = get_release(name)
        if rel is not None:
            if not rel.listed:
                raise SAEIdNotFoundError(
                    f"release {rel.name!r} has no vendored listing ({rel.verified}); its ids follow the pattern "
                    f"{rel.path!r}, e.g. {rel.example!r}")
            return rel.sae_rows()
        model = model or name
    rows = [r.row() for r in _load_table().values()]
    if model:
        rows = [r for r in rows if r["model"] and model.lower() in r["model"].lower()]
    return rows


def suggest(name: str, n: int = 5) -> list[str]:
    return close_matches(name, list(_load_table()) + list(_rules().get("aliases", {})), n)


def unknown_sae_id_error(release: Release, sae_id: str | None, valid: list[str] | None = None) -> SAEIdNotFoundError:
    """A friendly error for a wrong ``sae_id``: the closest listed ids (or, unlisted, from the repo / the pattern)."""
    if release.listed:
        pool, origin = [s.id for s in release.saes], f"the listing ({release.listing})"
    else:
        pool = valid if valid else release.examples()
        origin = f"the files of {release.repo_id}" if valid else f"the pattern {release.path!r}"
    sid = (sae_id or "").strip("/")
    parent = sid.rsplit("/", 1)[0] if "/" in sid else None
    siblings = [p for p in pool if parent and p.rsplit("/", 1)[0] == parent]  # same folder, other l0/width
    close = list(dict.fromkeys(siblings[:8] + close_matches(sid, pool, 5))) or pool[:5]
    return SAEIdNotFoundError(
        f"sae_id {sae_id!r} is not an SAE of release {release.name!r} (repo {release.repo_id}, e.g. "
        f"{release.example!r}; {len(pool)} listed; see list_pretrained({release.name!r})). Closest valid ids "
        f"(from {origin}): {close}"
    )
