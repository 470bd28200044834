/* sae-hooks feature dashboard: index (sortable, searchable, paged) and latent pages.
   Data comes from <script> files (window.DASH_INDEX, window.DASH_VOCAB, dashLatent(...) per latent),
   which load from file:// without a server (fetch() of local JSON is blocked there). */
"use strict";

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function tokText(id) {
  if (id < 0) return "";
  const v = window.DASH_VOCAB;
  const s = v && id < v.length ? v[id] : "#" + id;
  return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}
function fmt(x, d) {
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
  return x.toFixed(d === undefined ? 3 : d);
}
function pct(x) { return x === 0 ? "0%" : (x < 1e-4 ? (100 * x).toExponential(1) : (100 * x).toPrecision(3)) + "%"; }
function el(tag, attrs, html) {
  const e = document.createElement(tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  if (html !== undefined) e.innerHTML = html;
  return e;
}

/* ---------------------------------------------------------------- index page */
function dashIndex() {
  const D = window.DASH_INDEX;
  document.title = D.title + " - feature dashboard";
  document.getElementById("title").textContent = D.title;
  document.getElementById("meta").innerHTML = esc(D.description) + " &middot; " + D.d_sae.toLocaleString() +
    " latents &middot; " + D.n_tokens.toLocaleString() + " tokens &middot; " +
    D.n_dead.toLocaleString() + " dead (never fired)";
  const n = D.d_sae;
  let rows = Array.from({length: n}, (_, i) => i);
  let sortKey = "density", sortDir = -1, page = 0;
  const per = 100;
  const cols = [["i", "latent"], ["density", "density"], ["max", "max act"], ["mean", "mean act"], ["top", "top tokens"]];
  const key = {i: i => i, density: i => D.density[i], max: i => D.max[i], mean: i => D.mean[i],
               top: i => D.top[i].map(tokText).join(" ")};
  const table = document.getElementById("latents");
  const head = el("tr");
  for (const [k, label] of cols) {
    const th = el("th", {"data-key": k}, label);
    th.onclick = () => { sortDir = (sortKey === k) ? -sortDir : (k === "i" || k === "top" ? 1 : -1); sortKey = k; apply(); };
    head.appendChild(th);
  }
  table.appendChild(el("thead")).appendChild(head);
  const body = table.appendChild(el("tbody"));
  const search = document.getElementById("search");
  search.oninput = () => { page = 0; apply(); };
  function apply() {
    const q = search.value.trim().toLowerCase();
    rows = [];
    for (let i = 0; i < n; i++) {
      if (!q || String(i) === q || key.top(i).toLowerCase().includes(q)) rows.push(i);
    }
    const f = key[sortKey];
    rows.sort((a, b) => { const x = f(a), y = f(b); return (x < y ? -1 : x > y ? 1 : a - b) * sortDir; });
    for (const th of head.children) {
      th.className = th.dataset.key === sortKey ? (sortDir > 0 ? "sorted-asc" : "sorted-desc") : "";
    }
    render();
  }
  function render() {
    const pages = Math.max(1, Math.ceil(rows.length / per));
    page = Math.min(page, pages - 1);
    body.innerHTML = "";
    for (const i of rows.slice(page * per, page * per + per)) {
      const dead = D.count[i] === 0;
      const tr = el("tr", {"class": dead ? "latent-row dead" : "latent-row", "data-latent": i});
      tr.innerHTML = `<td><a href="latent.html#${i}">${i}</a>${dead ? ' <span class="dead-tag">dead</span>' : ""}</td>` +
        `<td class="num">${pct(D.density[i])}</td><td class="num">${fmt(D.max[i])}</td><td class="num">${fmt(D.mean[i])}</td>` +
        `<td class="tokname">${D.top[i].map(t => esc(tokText(t))).join(" \u00b7 ")}</td>`;
      body.appendChild(tr);
    }
    document.getElementById("pageinfo").textContent =
      `${rows.length.toLocaleString()} latents, page ${page + 1} of ${pages}`;
  }
  document.getElementById("prev").onclick = () => { page = Math.max(0, page - 1); render(); };
  document.getElementById("next").onclick = () => { page += 1; render(); };
  apply();
}

/* ---------------------------------------------------------------- latent page */
function contextHTML(ex, maxAct, left) {
  const parts = [];
  for (let j = 0; j < ex.t.length; j++) {
    const id = ex.t[j];
    if (id < 0) continue;
    const a = ex.a[j];
    const alpha = maxAct > 0 ? Math.min(1, Math.max(0, a / maxAct)) : 0;
    const style = a > 0 ? ` style="background: rgba(240, 120, 20, ${alpha.toFixed(3)})"` : "";
    const cls = "tok" + (j === left ? " peak" : "") + (a > 0 ? " active" : "");
    parts.push(`<span class="${cls}" data-act="${a}" title="${esc(tokText(id))}: ${fmt(a)}"${style}>${esc(tokText(id))}</span>`);
  }
  const layer = ex.l !== undefined && window.DASH_LATENT.layer_names ? ` <span class="muted">@${esc(window.DASH_LATENT.layer_names[ex.l])}</span>` : "";
  return `<div class="ctx"><span class="val">${fmt(ex.v)}</span>${parts.join("")}${layer}</div>`;
}

function histogramSVG(h) {
  const w = 420, ht = 130, pad = 22, n = h.counts.length;
  if (!n) return "<p class='muted'>never fired</p>";
  const m = Math.max(...h.counts), bw = (w - 2 * pad) / n;
  let s = `<svg class="histogram" width="${w}" height="${ht}" viewBox="0 0 ${w} ${ht}" style="max-width: 100%; height: auto" role="img" aria-label="activation histogram">`;
  h.counts.forEach((c, j) => {
    const bh = m ? (ht - 2 * pad) * c / m : 0;
    s += `<rect x="${(pad + j * bw).toFixed(1)}" y="${(ht - pad - bh).toFixed(1)}" width="${Math.max(1, bw - 1).toFixed(1)}" ` +
         `height="${bh.toFixed(1)}"><title>[${fmt(h.edges[j])}, ${fmt(h.edges[j + 1])}): ${c}</title></rect>`;
  });
  s += `<text x="${pad}" y="${ht - 6}">${fmt(h.edges[0])}</text>`;
  s += `<text x="${w - pad}" y="${ht - 6}" text-anchor="end">${fmt(h.edges[n])}</text>`;
  s += `<text x="${w / 2}" y="${ht - 6}" text-anchor="middle">activation (log scale)</text>`;
  s += `<text x="${pad}" y="12">${m.toLocaleString()}</text></svg>`;
  return s;
}

function layersSVG(L) {
  const w = 420, ht = 110, pad = 22, n = L.length, m = Math.max(...L.map(x => x.density)), bw = (w - 2 * pad) / n;
  let s = `<svg class="layers" width="${w}" height="${ht}" viewBox="0 0 ${w} ${ht}" style="max-width: 100%; height: auto" role="img" aria-label="activation by layer">`;
  L.forEach((x, j) => {
    const bh = m ? (ht - 2 * pad) * x.density / m : 0;
    s += `<rect x="${(pad + j * bw).toFixed(1)}" y="${(ht - pad - bh).toFixed(1)}" width="${Math.max(1, bw - 2).toFixed(1)}" height="${bh.toFixed(1)}">` +
         `<title>${esc(x.name)}: density ${pct(x.density)}, mean ${fmt(x.mean)}</title></rect>` +
         `<text x="${(pad + (j + 0.5) * bw).toFixed(1)}" y="${ht - 6}" text-anchor="middle">${j}</text>`;
  });
  return s + "</svg>";
}

function tokenTable(rows, cls) {
  return rows.map(([id, v]) => `<tr><td class="tokname">${esc(tokText(id))}</td><td class="num ${cls}">${fmt(v)}</td></tr>`).join("");
}

function renderLatent(L) {
  window.DASH_LATENT = L;
  const D = window.DASH_INDEX;
  const root = document.getElementById("latent");
  const left = D.left;
  let h = `<h1>Latent ${L.i}${L.count === 0 ? ' <span class="dead-tag">dead</span>' : ""}</h1>`;
  h += `<div class="stats"><span>density <b id="density">${pct(L.density)}</b></span>` +
       `<span>fires on <b>${L.count.toLocaleString()}</b> of ${D.n_examples.toLocaleString()}</span>` +
       `<span>max <b>${fmt(L.max)}</b></span><span>mean when firing <b>${fmt(L.mean)}</b></span></div>`;
  h += `<div class="grid"><div>`;
  h += `<h2>Top activations</h2><div id="top">` + L.top.map(ex => contextHTML(ex, L.max, left)).join("") + `</div>`;
  h += `<h2>Samples by activation quantile</h2><div id="quantiles">`;
  for (const b of L.bands) {
    h += `<div class="band"><div class="band-label">${esc(b.label)}: activations ${fmt(b.lo)} to ${fmt(b.hi)}</div>` +
         b.examples.map(ex => contextHTML(ex, L.max, left)).join("") + `</div>`;
  }
  h += `</div></div><div>`;
  h += `<h2>Activation histogram</h2><div id="histogram">${histogramSVG(L.hist)}</div>`;
  if (L.layers) h += `<h2>Activation by layer</h2><div id="by-layer">${layersSVG(L.layers)}</div>`;
  if (L.logits) {
    h += `<h2>Logit effects</h2><p class="muted">decoder direction through the unembedding</p><table class="logits" id="logits">` +
         `<tr><th>promoted</th><th></th><th>suppressed</th><th></th></tr>`;
    for (let j = 0; j < Math.max(L.logits.pos.length, L.logits.neg.length); j++) {
      const p = L.logits.pos[j], q = L.logits.neg[j];
      h += `<tr><td class="tokname">${p ? esc(tokText(p[0])) : ""}</td><td class="num pos">${p ? fmt(p[1]) : ""}</td>` +
           `<td class="tokname">${q ? esc(tokText(q[0])) : ""}</td><td class="num neg">${q ? fmt(q[1]) : ""}</td></tr>`;
    }
    h += `</table>`;
  }
  h += `<h2>Most co-active latents</h2><p class="muted">share of sampled firings on which the other latent also fires</p>` +
       `<table id="coactive">` + L.coactive.map(([j, f]) => `<tr><td><a href="latent.html#${j}">latent ${j}</a></td><td class="num">${pct(f)}</td></tr>`).join("") + `</table>`;
  if (L.jacobian) {
    h += `<h2>Top Jacobian entries</h2><p class="muted">${esc(L.jacobian.label)}</p><table id="jacobian"><tr><th>latent</th><th>mean J</th><th>co-firing</th></tr>` +
         L.jacobian.entries.map(([j, v, c]) => `<tr><td><a href="${L.jacobian.href}${j}">${esc(L.jacobian.other)} ${j}</a></td><td class="num">${fmt(v)}</td><td class="num">${c}</td></tr>`).join("") + `</table>`;
  }
  h += `</div></div>`;
  root.innerHTML = h;
  document.title = `Latent ${L.i} - ${D.title}`;
}

function dashLatentPage() {
  const D = window.DASH_INDEX;
  function load() {
    const i = parseInt((location.hash || "#0").slice(1), 10) || 0;
    document.getElementById("prevlink").href = "#" + Math.max(0, i - 1);
    document.getElementById("nextlink").href = "#" + Math.min(D.d_sae - 1, i + 1);
    const root = document.getElementById("latent");
    if (D.count[i] === 0 || i >= D.d_sae) {
      root.innerHTML = `<h1>Latent ${i} <span class="dead-tag">dead</span></h1><p>This latent never fired on the ${D.n_tokens.toLocaleString()} tokens.</p>`;
      return;
    }
    root.innerHTML = `<p class="muted">loading latent ${i}...</p>`;
    const s = document.createElement("script");
    s.src = `data/latents/${Math.floor(i / 1000)}/${i}.js`;
    s.onerror = () => { root.innerHTML = `<p>No data file for latent ${i}.</p>`; };
    document.head.appendChild(s);
  }
  window.addEventListener("hashchange", load);
  load();
}
window.dashLatent = renderLatent;
