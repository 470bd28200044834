"""Vendored listings of published SAE releases: the ground truth the release registry is derived from.

* ``saelens.json.gz``: SAELens's ``sae_lens/pretrained_saes.yaml`` trimmed by ``scripts/vendor_listings.py``
  (release -> repo, model, SAELens conversion, and every SAE's ``id``, repo ``path``, ``norm_scaling_factor``).
* ``saelens_newer.json.gz``: the same trim of the listing shipped in ``sae-lens==6.54.12`` (PyPI), for the releases
  the older snapshot lacks: every Gemma Scope 2 release (SAELens conversion ``gemma_3``), Qwen Scope, Goodfire.

:func:`listings` returns ``{release: Listing}``; nothing here touches the network.
"""

from __future__ import annotations

import gzip
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


@lru_cache(maxsize=1)
def listings() -> dict[str, Listing]:
    out: dict[str, Listing] = {}
    for file in ("saelens.json.gz", "saelens_newer.json.gz"):  # the newer one adds releases (none overlap)
        with gzip.open(HERE / file, "rt") as f:
            sl = json.load(f)
        src = f"{sl['source']} {sl['file']}"
        for name, r in sl["releases"].items():
            saes = tuple(ListedSAE(s["id"], s.get("path", s["id"]), s.get("norm_scaling_factor")) for s in r["saes"])
            out[name] = Listing(name, r["repo_id"], r.get("model"), r.get("conversion_func"), saes, src,
                                tuple(sorted((r.get("config_overrides") or {}).items())))
    return out
