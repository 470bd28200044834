#!/usr/bin/env python
"""Feature-dashboard scale: d_sae 131,072 over 10^6 tokens in one pass, bounded memory.

The embedded model (``d_model`` 128) at ``transformer.h.1`` over ``--tokens`` tokens of Python's pydoc
topics (cycled), with ``--latents``:

* ``sae``: a random TopK SAE (``--d-sae``, ``--k``) encodes the real activations (end to end; at d_sae
  131,072 over 10^6 tokens its random weights fire 39,948 latents, each of which gets a page);
* ``synthetic``: the SAE encoder is replaced by ``k`` latents per token drawn from a Zipf-like frequency
  distribution with exponential values, so the dashboard machinery (collector + pages) can be timed at
  full scale without the encoder's dense ``(tokens, d_in) @ (d_in, d_sae)`` product, which is the SAE's
  own cost and is timed per token by the ``sae`` mode.

Times, separately: the model forward (activation reader), the encoder, the collector (all per-latent
statistics, heaps, histograms) and writing the pages; reports the peak resident memory of the process
and the collector's own state.

    python benchmarks/bench_dashboard.py [--latents synthetic|sae --d-sae 131072 --tokens 1000000 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-sae", type=int, default=131072)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/sae-hooks-dashboard-bench")
    ap.add_argument("--no-write", action="store_true", help="skip writing the pages")
    ap.add_argument("--latents", choices=["sae", "synthetic"], default="synthetic")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from sae_hooks.app.demo import load_default_model, pydoc_texts
    from sae_hooks.eval.dashboard import DictionaryView, FeatureCollector, logit_effects, write_dashboard
    from sae_hooks.eval.dashboard import find_unembedding, token_strings
    from sae_hooks.eval.dashboard.stream import cat_sparse, encode_chunks, resolve_reader, sparse_of
    from sae_hooks.saes.base import SparseLatents
    from sae_hooks.saes.registry import make_sae
    from sae_hooks.train.sources import pack_texts, token_mask

    model, tok = load_default_model()
    train, held = pydoc_texts()
    batches = pack_texts(tok, train + held, a.seq_len, a.batch_size, 0)
    sae = make_sae("topk", model.config.n_embd, a.d_sae, k=a.k)
    site = "transformer.h.1"
    reader = resolve_reader(model, [site], 0)
    collector = FeatureCollector(a.d_sae)
    gen = torch.Generator().manual_seed(0)
    freq = 1.0 / (torch.arange(a.d_sae, dtype=torch.float64) + 20.0) ** 0.8
    cdf = (freq.cumsum(0) / freq.sum()).float()
    perm = torch.randperm(a.d_sae, generator=gen)

    def synthetic(n: int) -> SparseLatents:
        u = torch.rand(n, a.k, generator=gen)
        idx = perm[torch.searchsorted(cdf, u).clamp_max(a.d_sae - 1)]
        return SparseLatents(torch.empty(n, a.k).exponential_(generator=gen), idx, a.d_sae)

    state_bytes = sum(t.numel() * t.element_size() for h in (collector.top, collector.samples)
                      for t in (h.keys, h.slots, *h.pool.values()))
    state_bytes += collector.hist.numel() * 4 + collector.count.numel() * 8 * 2 + collector.max.numel() * 4
    t_model = t_enc = t_coll = 0.0
    seen, i = 0, 0
    from tqdm.auto import tqdm

    bar = tqdm(total=a.tokens, unit="tok", unit_scale=True, desc="dashboard bench")
    t0 = time.perf_counter()
    with torch.no_grad():
        while seen < a.tokens:
            ids = batches[i % len(batches)]
            i += 1
            mask = torch.ones_like(ids)
            ta = time.perf_counter()
            x = reader.read(ids, mask)[site]
            tb = time.perf_counter()
            if a.latents == "sae":
                lat = cat_sparse(encode_chunks(lambda c: sparse_of(sae.encode_with_state(c)[0], a.d_sae), x, a.d_sae), a.d_sae)
            else:
                lat = synthetic(x.shape[0])
            tc = time.perf_counter()
            collector.update(ids, token_mask(ids, mask, 0), lat)
            td = time.perf_counter()
            t_model, t_enc, t_coll = t_model + tb - ta, t_enc + tc - tb, t_coll + td - tc
            seen += ids.numel()
            bar.update(ids.numel())
    bar.close()
    t_pass = time.perf_counter() - t0
    stats = collector.finish()
    result = {
        "latents": a.latents, "d_sae": a.d_sae, "k": a.k, "tokens": seen, "threads": a.threads,
        "tokens_per_s": round(seen / t_pass), "encoder_tokens_per_s": round(seen / max(t_enc, 1e-9)),
        "pass_seconds": round(t_pass, 1), "model_forward_s": round(t_model, 1), "sae_encode_s": round(t_enc, 1),
        "collector_s": round(t_coll, 1), "collector_tokens_per_s": round(seen / t_coll),
        "collector_state_mb": round(state_bytes / 2**20), "alive_latents": int((stats.count > 0).sum()),
    }
    if not a.no_write:
        from pathlib import Path

        tw = time.perf_counter()
        W_U = find_unembedding(model)
        view = DictionaryView(stats, f"bench d_sae={a.d_sae}", "benchmark", logits=logit_effects(sae.W_dec, W_U))
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        write_dashboard(view, token_strings(tok, W_U.shape[1]), out, progress=True)
        result["write_seconds"] = round(time.perf_counter() - tw, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
