"""Vendor a trimmed snapshot of SAELens's ``sae_lens/pretrained_saes.yaml`` into ``sae_hooks/hub/listings/``.

The release registry (:mod:`sae_hooks.hub.releases`) is derived from these snapshots at import time, so it cannot
drift from the listings; re-run this script to refresh them::

    python scripts/vendor_listings.py PATH/TO/pretrained_saes.yaml --source "jbloomAus/SAELens@<commit> (tag)"

Kept per release: ``repo_id``, ``model``, ``conversion_func``, ``config_overrides``; per SAE: ``id``, ``path``
(omitted when equal to ``id``) and ``norm_scaling_factor``. Written as deterministic gzip (mtime 0, sorted keys).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "sae_hooks" / "hub" / "listings" / "saelens.json.gz"


def trim(raw: dict) -> dict:
    out = {}
    for name, rel in raw.items():
        saes = []
        for s in rel["saes"]:
            row = {"id": str(s["id"])}
            path = str(s.get("path", s["id"]))
            if path != row["id"]:
                row["path"] = path
            if s.get("norm_scaling_factor") is not None:
                row["norm_scaling_factor"] = float(s["norm_scaling_factor"])
            saes.append(row)
        out[name] = {"repo_id": rel["repo_id"], "model": rel.get("model"), "conversion_func": rel.get("conversion_func"),
                     "config_overrides": rel.get("config_overrides") or {}, "saes": saes}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("yaml_path")
    ap.add_argument("--source", required=True, help="where the yaml came from (repo@commit)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    data = {"source": a.source, "file": "sae_lens/pretrained_saes.yaml",
            "releases": trim(yaml.safe_load(Path(a.yaml_path).read_text()))}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(blob)
    print(f"{a.out}: {len(data['releases'])} releases, {sum(len(r['saes']) for r in data['releases'].values())} SAEs")


if __name__ == "__main__":
    main()
