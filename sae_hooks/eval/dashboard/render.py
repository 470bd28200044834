"""Write collected statistics as a static HTML feature browser (works from ``file://``, no server, no CDN).

Layout of a dashboard folder::

    index.html            every latent: density, max/mean activation, top tokens; search, sort, pages
    latent.html           one latent, chosen by the URL fragment: latent.html#123
    data/index.js         window.DASH_INDEX = {...}   (per-latent summary arrays)
    data/vocab.js         window.DASH_VOCAB = [...]   (token strings, shared by all pages)
    data/latents/<i // 1000>/<i>.js   dashLatent({...})   (loaded lazily by latent.html; none for dead latents)

Data files are JavaScript calling a global function rather than JSON, because browsers refuse
``fetch()`` of local files but load ``<script src>`` from ``file://``. The CSS and JavaScript
(``static/``) are inlined into both HTML pages.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .collect import FeatureStats

STATIC = Path(__file__).resolve().parent / "static"
N_BANDS = 4


@dataclass
class DictionaryView:
    """One dictionary's statistics plus what the pages show beside them."""

    stats: FeatureStats
    title: str
    description: str = ""
    logits: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # top ids, top values, bottom ids, bottom values
    layer_names: list[str] | None = None
    jacobian: dict[int, list[tuple[int, float, int]]] | None = None
    jacobian_label: str = ""
    jacobian_href: str = ""
    jacobian_other: str = "latent"
    extra_index: dict[str, Any] = field(default_factory=dict)


def logit_effects(W_dec: Tensor, W_U: Tensor, n: int = 10, chunk: int = 2048) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top and bottom ``n`` tokens of ``W_dec @ W_U`` per latent: ``W_dec (d_sae, d)``, ``W_U (d, vocab)``.

    Computed ``chunk`` latents at a time, so no ``(d_sae, vocab)`` matrix is held.
    """
    W_U = W_U.detach().float().cpu()
    n = min(n, W_U.shape[1])
    parts: list[list[Tensor]] = [[], [], [], []]
    for a in range(0, W_dec.shape[0], chunk):
        eff = W_dec[a : a + chunk].detach().float().cpu() @ W_U
        hi, lo = eff.topk(n, dim=1), eff.topk(n, dim=1, largest=False)
        for lst, t in zip(parts, (hi.indices, hi.values, lo.indices, lo.values)):
            lst.append(t)
    return tuple(torch.cat(p) for p in parts)  # type: ignore[return-value]


def _r(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (keeps the data files small)."""
    if x == 0 or not math.isfinite(x):
        return 0.0
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _lists(h: dict[str, Tensor], idx: Tensor) -> dict[str, list]:
    """The rows ``idx`` of a top-k structure as Python lists (one ``tolist`` per field, not per number)."""
    return {name: h[name][idx].float().numpy().tolist() if name == "acts" else h[name][idx].numpy().tolist()
            for name in ("keys", "value", "tokens", "acts", "layer", "coactive")}


def _examples(h: dict[str, list], r: int, order: list[int]) -> list[dict[str, Any]]:
    """Examples ``order`` of row ``r``; window activations are float16 values (short exact decimals)."""
    return [{"v": _r(h["value"][r][j]), "t": h["tokens"][r][j], "a": h["acts"][r][j], "l": h["layer"][r][j]} for j in order]


def _filled(h: dict[str, list], r: int) -> list[int]:
    return [j for j, k in enumerate(h["keys"][r]) if k != -math.inf]


def _bands(h: dict[str, list], r: int) -> list[dict[str, Any]]:
    """The uniform sample of firings, sorted by activation and cut into ``N_BANDS`` quantile bands."""
    filled = sorted(_filled(h, r), key=lambda j: -h["value"][r][j])
    bands = []
    n = len(filled)
    for b in range(N_BANDS):
        part = filled[round(b * n / N_BANDS) : round((b + 1) * n / N_BANDS)]
        if not part:
            continue
        ex = _examples(h, r, part)
        hi_q, lo_q = 100 - 100 * b // N_BANDS, 100 - 100 * (b + 1) // N_BANDS
        bands.append({"label": f"quantile {lo_q}-{hi_q}%", "lo": ex[-1]["v"], "hi": ex[0]["v"], "examples": ex})
    return bands


def _coactive(h: dict[str, list], r: int, n: int = 10) -> list[list[float]]:
    """Latents most often among the strongest others on the sampled firings, with the share of samples."""
    filled = _filled(h, r)
    counts: dict[int, int] = {}
    for j in filled:
        for other in h["coactive"][r][j]:
            if other >= 0:
                counts[other] = counts.get(other, 0) + 1
    best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [[j, _r(c / len(filled))] for j, c in best]


def _histogram(edges: list[float], lo: float, counts: list[int], peak: float) -> dict[str, list]:
    """The non-empty span of a latent's histogram; ``edges`` are ``[0, *bin_edges, inf]``."""
    nz = [j for j, c in enumerate(counts) if c]
    if not nz:
        return {"edges": [], "counts": []}
    a, b = nz[0], nz[-1] + 1
    e = edges[a : b + 1]
    # Open-ended outer bins are drawn up to the observed maximum / down to the lowest edge.
    e[-1] = min(e[-1], peak) if math.isinf(e[-1]) else e[-1]
    e[0] = e[0] if e[0] > 0 else min(lo, peak)
    return {"edges": [_r(x) for x in e], "counts": counts[a:b]}


def latent_records(view: DictionaryView, latents: list[int]) -> list[dict[str, Any]]:
    """Everything ``latent.html`` shows, for each latent in ``latents``."""
    s = view.stats
    idx = torch.tensor(latents, dtype=torch.long)
    top, samples = _lists(s.top, idx), _lists(s.samples, idx)
    hist = s.hist[idx].numpy().tolist()
    # Per-latent numbers for this chunk as Python lists (the stats' density/mean are whole-array properties).
    count, peak = s.count[idx].tolist(), s.max[idx].tolist()
    total = max(1, s.n_tokens * s.n_layers)
    mean = (s.sum[idx] / s.count[idx].clamp_min(1)).tolist()
    edges = [0.0, *s.settings.bin_edges(), math.inf]
    out = []
    for r, i in enumerate(latents):
        rec: dict[str, Any] = {
            "i": i, "count": count[r], "density": _r(count[r] / total),
            "max": _r(peak[r]), "mean": _r(mean[r]),
            "hist": _histogram(edges, s.settings.hist_lo, hist[r], peak[r]),
            "top": _examples(top, r, _filled(top, r)),
            "bands": _bands(samples, r),
            "coactive": _coactive(samples, r),
        }
        if view.logits is not None:
            ti, tv, bi, bv = view.logits
            rec["logits"] = {"pos": [[int(a), _r(float(b))] for a, b in zip(ti[i].tolist(), tv[i].tolist())],
                             "neg": [[int(a), _r(float(b))] for a, b in zip(bi[i].tolist(), bv[i].tolist())]}
        if s.n_layers > 1:
            names = view.layer_names or [str(j) for j in range(s.n_layers)]
            rec["layers"] = [
                {"name": names[j], "density": _r(float(s.layer_count[j, i]) / max(1, s.n_tokens)),
                 "mean": _r(float(s.layer_sum[j, i]) / max(1, int(s.layer_count[j, i])))}
                for j in range(s.n_layers)
            ]
        if view.jacobian is not None:
            rec["jacobian"] = {
                "label": view.jacobian_label, "href": view.jacobian_href, "other": view.jacobian_other,
                "entries": [[j, _r(v), c] for j, v, c in view.jacobian.get(i, [])],
            }
        out.append(rec)
    return out


def latent_record(view: DictionaryView, i: int) -> dict[str, Any]:
    """Everything ``latent.html`` shows for latent ``i``."""
    return latent_records(view, [i])[0]


def index_record(view: DictionaryView) -> dict[str, Any]:
    s = view.stats
    top_ids = s.top["tokens"][:, :3, s.settings.left]  # the peak token of the three top contexts
    filled = torch.isfinite(s.top["keys"][:, :3])
    tops = []
    for ids, ok in zip(top_ids.tolist(), filled.tolist()):
        seen: list[int] = []
        for t, f in zip(ids, ok):
            if f and t not in seen:
                seen.append(t)
        tops.append(seen)
    return {
        "title": view.title, "description": view.description, "d_sae": s.d_sae, "n_tokens": s.n_tokens,
        "n_examples": s.n_tokens * s.n_layers, "n_dead": int((s.count == 0).sum()), "left": s.settings.left,
        "count": s.count.tolist(), "density": [_r(x) for x in s.density.tolist()],
        "max": [_r(x) for x in s.max.tolist()], "mean": [_r(x) for x in s.mean.tolist()], "top": tops,
        **view.extra_index,
    }


def _page(body: str, title: str, scripts: list[str], init: str) -> str:
    css = (STATIC / "dashboard.css").read_text(encoding="utf-8")
    js = (STATIC / "dashboard.js").read_text(encoding="utf-8")
    tags = "\n".join(f'<script src="{s}"></script>' for s in scripts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>\n{css}</style>\n{tags}\n<script>\n{js}</script>\n</head>\n<body>\n{body}\n"
        f'<script>{init}();</script>\n</body></html>\n'
    )


INDEX_BODY = """<h1 id="title"></h1><div class="meta" id="meta"></div>
<div class="search"><input id="search" type="search" placeholder="search: latent number or token text" autofocus></div>
<div class="pager"><button id="prev">&larr; previous</button><span id="pageinfo"></span><button id="next">next &rarr;</button></div>
<table id="latents"></table>"""

LATENT_BODY = """<div class="nav"><a id="prevlink" href="#">&larr; previous</a> &middot; <a href="index.html">all latents</a>
&middot; <a id="nextlink" href="#">next &rarr;</a></div>
<div id="latent"></div>"""


def _js(name: str, value: Any) -> str:
    return f"{name}{json.dumps(value, separators=(',', ':'), ensure_ascii=False)};\n"


def write_dashboard(view: DictionaryView, vocab: list[str] | None, folder: Path, progress: bool = False) -> Path:
    """Write one dictionary's pages and data files into ``folder`` (which must exist)."""
    data = folder / "data"
    (data / "latents").mkdir(parents=True, exist_ok=True)
    index = index_record(view)
    if view.layer_names:
        index["layer_names"] = view.layer_names
    (data / "index.js").write_text(_js("window.DASH_INDEX = ", index), encoding="utf-8")
    (data / "vocab.js").write_text(_js("window.DASH_VOCAB = ", vocab or []), encoding="utf-8")
    scripts = ["data/index.js", "data/vocab.js"]
    (folder / "index.html").write_text(_page(INDEX_BODY, view.title, scripts, "dashIndex"), encoding="utf-8")
    (folder / "latent.html").write_text(_page(LATENT_BODY, view.title, scripts, "dashLatentPage"), encoding="utf-8")
    alive = torch.nonzero(view.stats.count > 0).squeeze(1).tolist()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(alive), desc="writing latent pages", unit="latent")
    made: set[int] = set()
    for a in range(0, len(alive), 1024):
        for rec in latent_records(view, alive[a : a + 1024]):
            i = rec["i"]
            sub = data / "latents" / str(i // 1000)
            if i // 1000 not in made:
                sub.mkdir(exist_ok=True)
                made.add(i // 1000)
            record = json.dumps(rec, separators=(",", ":"), ensure_ascii=False)
            (sub / f"{i}.js").write_text(f"dashLatent({record});\n", encoding="utf-8")
        if bar is not None:
            bar.update(len(alive[a : a + 1024]))
    if bar is not None:
        bar.close()
    return folder


def write_pair_index(folder: Path, title: str, parts: dict[str, str]) -> None:
    links = "".join(f'<li><a href="{name}/index.html">{html.escape(label)}</a></li>' for name, label in parts.items())
    title = html.escape(title)
    css = (STATIC / "dashboard.css").read_text(encoding="utf-8")
    (folder / "index.html").write_text(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{css}</style></head>'
        f"<body><h1>{title}</h1><ul>{links}</ul></body></html>\n",
        encoding="utf-8",
    )
