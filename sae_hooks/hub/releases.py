"""A small registry of well-known SAE releases, kept as data in ``releases.json``.

Each release maps a name (``"gemma-scope-2b-pt-res"``) to a Hub repo, an ``sae_id`` path pattern with named
fields (``layer_{layer}/width_{width}/average_l0_{l0}``), the format, the model, and TransformerLens hooks
templated on the same fields. ``sae_hooks.load(name, sae_id=...)`` resolves through it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import HubFileNotFoundError, close_matches

RELEASES_FILE = Path(__file__).with_name("releases.json")
_NUMERIC = {"layer", "l0"}


class SAEIdNotFoundError(HubFileNotFoundError):
    """An ``sae_id`` that names no SAE of a release or repo (the message suggests the closest valid ones)."""


@dataclass(frozen=True)
class Release:
    name: str
    repo_id: str | None
    format: str
    model: str | None
    path: str
    hooks: dict[str, str] = field(default_factory=dict)
    layers: int | None = None
    n_layers: int | None = None
    example: str = ""
    source: str = "hub"
    verified: str = ""

    @property
    def on_hub(self) -> bool:
        return self.source == "hub" and self.repo_id is not None

    def regex(self) -> re.Pattern[str]:
        out, pos = "", 0
        for m in re.finditer(r"\{(\w+)\}", self.path):
            out += re.escape(self.path[pos:m.start()])
            name = m.group(1)
            out += rf"(?P<{name}>\d+)" if name in _NUMERIC else rf"(?P<{name}>[^/]+?)"
            pos = m.end()
        return re.compile(out + re.escape(self.path[pos:]))

    def match(self, sae_id: str | None) -> dict[str, str] | None:
        """The pattern's fields for ``sae_id``, or ``None`` when it does not fit the pattern."""
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
        """Plausible sae_ids (the example with every layer number), for suggestions when the Hub is unreachable."""
        if not self.example:
            return [""] if self.path == "" else []
        out = [self.example]
        fields = self.match(self.example) or {}
        if "layer" in fields and self.layers:
            for i in range(self.layers):
                out.append(self.path.format(**{**fields, "layer": i}))
        return list(dict.fromkeys(out))

    def url(self, sae_id: str) -> str | None:
        return self.source.format(path=sae_id) if not self.on_hub and "{path}" in self.source else None

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "repo_id": self.repo_id, "format": self.format, "model": self.model,
                "path": self.path, "hooks": dict(self.hooks), "layers": self.layers or self.n_layers,
                "example": self.example, "source": self.source}


@lru_cache(maxsize=1)
def _load_table() -> dict[str, Release]:
    data = json.loads(RELEASES_FILE.read_text())
    out = {}
    for name, r in data["releases"].items():
        out[name] = Release(name=name, repo_id=r.get("repo_id"), format=r["format"], model=r.get("model"),
                            path=r.get("path", ""), hooks=r.get("hooks", {}), layers=r.get("layers"),
                            n_layers=r.get("n_layers"), example=r.get("example", ""), source=r.get("source", "hub"),
                            verified=r.get("verified", ""))
    return out


def releases() -> dict[str, Release]:
    return dict(_load_table())


def get_release(name: str) -> Release | None:
    return _load_table().get(name)


def list_pretrained(model: str | None = None) -> list[dict[str, Any]]:
    """The registry as a list of rows (``name``, ``repo_id``, ``format``, ``model``, ``path``, ``hooks``, ...).

    ``model`` keeps only releases whose model name contains it (``list_pretrained("gemma-2-2b")``).
    """
    rows = [r.row() for r in _load_table().values()]
    if model:
        rows = [r for r in rows if r["model"] and model.lower() in r["model"].lower()]
    return rows


def suggest(name: str, n: int = 5) -> list[str]:
    return close_matches(name, list(_load_table()), n)


def unknown_sae_id_error(release: Release, sae_id: str | None, valid: list[str] | None) -> SAEIdNotFoundError:
    """A friendly error for a wrong ``sae_id``: closest valid ids (from the repo when known, else the pattern)."""
    pool = valid if valid else release.examples()
    close = close_matches(sae_id or "", pool, 5) or pool[:5]
    origin = f"the files of {release.repo_id}" if valid else f"the pattern {release.path!r}"
    return SAEIdNotFoundError(
        f"sae_id {sae_id!r} is not an SAE of release {release.name!r} (repo {release.repo_id}, pattern "
        f"{release.path!r}, e.g. {release.example!r}). Closest valid ids (from {origin}): {close}"
    )
