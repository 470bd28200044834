"""Vendored listings of published SAE releases: the ground truth the release registry is derived from.

* ``saelens.json.gz``: SAELens's ``sae_lens/pretrained_saes.yaml`` trimmed by ``scripts/vendor_listings.py``
  (release -> repo, model, SAELens conversion, and every SAE's ``id``, repo ``path``, ``norm_scaling_factor``).
* ``gemma_scope_2.json``: Gemma Scope 2 releases from a newer SAELens listing, transcribed as grids.

:func:`listings` returns ``{release: Listing}``; nothing here touches the network.
"""

from __future__ import annotations

import gzip
import itertools
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


@dataclass(frozen=True)
class ListedSAE:
    """One SAE of a release: SAELens's ``id``, its folder/file ``path`` in the repo, SAELens's norm factor."""

    id: str
    path: str
    norm_scaling_factor: float | None = None


@dataclass(frozen=True)
class Listing:
    name: str
    repo_id: str
    model: str | None
    conversion_func: str | None
    saes: tuple[ListedSAE, ...]
    source: str
    config_overrides: tuple[tuple[str, Any], ...] = ()


def _layers(spec: Any) -> list[int]:
    if isinstance(spec, str):
        lo, hi = spec.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in spec]


def _expand(grid: dict[str, Any], id_t: str, path_t: str) -> list[ListedSAE]:
    keys = list(grid)
    values = [_layers(grid[k]) if k == "layer" else list(grid[k]) for k in keys]
    out = []
    for combo in itertools.product(*values):
        f = dict(zip(keys, combo))
        out.append(ListedSAE(id=id_t.format(**f), path=path_t.format(**f)))
    return out


@lru_cache(maxsize=1)
def listings() -> dict[str, Listing]:
    out: dict[str, Listing] = {}
    with gzip.open(HERE / "saelens.json.gz", "rt") as f:
        sl = json.load(f)
    src = f"{sl['source']} {sl['file']}"
    for name, r in sl["releases"].items():
        saes = tuple(ListedSAE(s["id"], s.get("path", s["id"]), s.get("norm_scaling_factor")) for s in r["saes"])
        out[name] = Listing(name, r["repo_id"], r.get("model"), r.get("conversion_func"), saes, src,
                            tuple(sorted((r.get("config_overrides") or {}).items())))
    gs2 = json.loads((HERE / "gemma_scope_2.json").read_text())
    for name, r in gs2["releases"].items():
        saes = tuple(_expand(r["grid"], r["id"], r["path"]))
        out[name] = Listing(name, r["repo_id"], r.get("model"), r.get("conversion_func"), saes,
                            f"{gs2['source']} {gs2['file']} (transcribed grid)")
    return out
