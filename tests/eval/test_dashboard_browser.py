"""Feature dashboards rendered by a real browser (headless Chromium): the DOM shows what the SAE computes.

The truth is computed here independently of the collector: the activations at the SAE's site read
with a plain forward hook, every latent encoded densely, and per latent the top activations and
firing counts by brute force over all tokens.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import torch

from _dash_browser import dump_dom, needs_chromium, screenshot

pytest.importorskip("transformers")

N_TOKENS = 6000


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from sae_hooks.app.demo import load_default_model, pydoc_texts
    from sae_hooks.config import Site
    from sae_hooks.eval.dashboard import CollectorSettings, build_dashboard
    from sae_hooks.saes.registry import make_sae
    from sae_hooks.train.sources import pack_texts

    model, tok = load_default_model()
    torch.manual_seed(0)
    sae = make_sae("topk", 128, 256, k=8)
    with torch.no_grad():  # non-trivial weights: random biases, rows of different norms
        sae.b_enc.copy_(torch.randn(256) * 0.3)
        sae.b_dec.copy_(torch.randn(128) * 0.1)
        sae.W_enc.mul_(torch.rand(1, 256) * 2 + 0.5)
    sae.cfg.sites = [Site(hook="blocks.1.hook_resid_post", module="transformer.h.1")]
    _, held = pydoc_texts()
    batches = pack_texts(tok, held, 64, 8, 0)
    out = tmp_path_factory.mktemp("dash") / "dash"
    settings = CollectorSettings(n_top=6, n_samples=8, left=5, right=2)
    build_dashboard(sae, model, batches, out, tokenizer=tok, max_tokens=N_TOKENS, settings=settings, progress=False)

    # Independent truth: one forward hook, dense latents, brute force.
    rows, ids = [], []
    seen = 0
    for b in batches:
        if seen >= N_TOKENS:
            break
        b = b[: -(-(N_TOKENS - seen) // b.shape[1])]
        seen += b.numel()
        got = {}
        h = model.transformer.h[1].register_forward_hook(lambda m, a, o: got.__setitem__("x", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            model(b, attention_mask=torch.ones_like(b))
        h.remove()
        keep = b != 0
        with torch.no_grad():
            rows.append(sae.encode(got["x"][keep]))
        ids.append(b[keep])
    dense = torch.cat(rows)
    return out, sae, tok, dense, torch.cat(ids), settings


def _ctx_values(section: str) -> list[float]:
    return [float(v) for v in re.findall(r'<span class="val">([-0-9.e+]+)</span>', section)]


def _section(dom: str, element_id: str) -> str:
    start = dom.index(f'id="{element_id}"')
    end = dom.find("<h2>", start)
    return dom[start : end if end > 0 else len(dom)]


@needs_chromium
def test_latent_page_shows_top_contexts_highlights_and_histogram(built):
    out, sae, tok, dense, ids, settings = built
    counts = (dense > 0).sum(0)
    j = int(counts.argsort(descending=True)[3])  # a frequently firing latent
    dom = dump_dom(out / "latent.html", f"#{j}")
    dom = dom[dom.index('<div id="latent">') :]  # the rendered body (the inline script holds the same markup)
    assert f"<h1>Latent {j}" in dom
    # Density and the top activations equal the brute-force ones.
    density = float(counts[j]) / dense.shape[0]
    shown = re.search(r'id="density">([0-9.e+-]+)%<', dom).group(1)
    assert float(shown) == pytest.approx(100 * density, rel=2e-3)
    top = _section(dom, "top")
    want = dense[:, j].topk(settings.n_top).values.tolist()
    assert _ctx_values(top) == pytest.approx(want, rel=6e-4)  # shown to 4 significant digits
    # Each top context highlights its peak token with the activation as hover value and colour.
    peaks = re.findall(r'<span class="tok peak active" data-act="([0-9.e+-]+)" title="([^"]*)"[^>]*style="background: rgba', top)
    assert len(peaks) == settings.n_top
    best = int(dense[:, j].argmax())
    assert float(peaks[0][0]) == pytest.approx(float(dense[best, j]), rel=1e-3)  # float16 window value
    assert html.unescape(peaks[0][1]).rsplit(":", 1)[0] == tok.decode([int(ids[best])]).replace("\n", "\u21b5")
    # Quantile bands: every sampled firing is a real firing of this latent, bands in descending order.
    bands = _section(dom, "quantiles")
    sampled = _ctx_values(bands)
    assert len(sampled) == min(settings.n_samples, int(counts[j]))
    assert sampled == sorted(sampled, reverse=True)
    fired = dense[:, j][dense[:, j] > 0]
    assert all(float((fired - v).abs().min()) <= 6e-4 * v for v in sampled)
    # The histogram: one bar per non-empty bin, the counts adding up to the firings.
    hist = _section(dom, "histogram")
    assert 'class="histogram"' in hist
    bars = re.findall(r"<title>\[[^)]*\): (\d+)</title>", hist)
    assert sum(int(b) for b in bars) == int(counts[j])
    # Logit effects (residual stream site) and co-active latents are present.
    assert 'id="logits"' in dom and dom.count('class="num pos"') == 10
    coactive = re.findall(r'href="latent.html#(\d+)">latent', _section(dom, "coactive"))
    assert coactive and all(int(c) != j for c in coactive)
    assert all(int(((dense[:, j] > 0) & (dense[:, int(c)] > 0)).sum()) > 0 for c in coactive)


@needs_chromium
def test_index_page_lists_latents_sorted_with_dead_marked(built, tmp_path):
    out, sae, tok, dense, ids, settings = built
    dom = dump_dom(out / "index.html")
    dom = dom[dom.index("<body>") :]
    rows = re.findall(r'<tr class="latent-row( dead)?" data-latent="(\d+)">', dom)
    assert len(rows) == 100  # the first page
    counts = (dense > 0).sum(0)
    shown = [int(i) for _, i in rows]
    want = sorted(range(sae.cfg.d_sae), key=lambda i: (-int(counts[i]), i))[:100]
    assert [int(counts[i]) for i in shown] == [int(counts[i]) for i in want]  # sorted by density, descending
    n_dead = int((counts == 0).sum())
    assert f"{n_dead} dead" in dom
    assert re.search(r'<input id="search"', dom)
    image = screenshot(out / "index.html", tmp_path / "index.png", size="900,600")
    assert image.shape[:2] == (600, 900)
    assert len(set(map(tuple, image.reshape(-1, image.shape[-1])[::7].tolist()))) > 20  # text, not a blank page
    assert (image[..., :3] < 128).mean() > 0.005


@needs_chromium
def test_latent_page_screenshot_is_not_blank(built, tmp_path):
    out, sae, tok, dense, ids, settings = built
    j = int((dense > 0).sum(0).argmax())
    image = screenshot(out / "latent.html", tmp_path / "latent.png", f"#{j}", size="900,700")
    rgb = image[..., :3].astype(int)
    orange = (rgb[..., 0] > 200) & (rgb[..., 1] > 80) & (rgb[..., 1] < 200) & (rgb[..., 2] < 120)
    assert orange.mean() > 0.001  # highlighted tokens and histogram bars are drawn
    assert (rgb < 128).all(-1).mean() > 0.005  # and text


def test_pages_load_nothing_from_the_network(built):
    out = built[0]
    for page in ("index.html", "latent.html"):
        text = (out / page).read_text()
        assert not re.search(r'(src|href)="(https?:)?//', text), page
