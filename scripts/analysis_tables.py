"""Reproduction tables of docs/mdl.md and docs/matching.md from the SAEs of
``scripts/train_analysis_saes.py``:

    python scripts/analysis_tables.py --runs runs/analysis [--batches 4]

* MDL: bits/token (entropy and bound) of every TopK SAE at its own precision (the coarsest at which
  the FVU rises by ≤ 0.01) against the dense activations at that precision;
* matching: the shared fraction of each seed pair (TopK k=16 and ReLU, every width).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sae_hooks import load_native
from sae_hooks.app.demo import load_default_model, pydoc_texts
from sae_hooks.eval.matching import match_latents
from sae_hooks.eval.mdl import mdl_report
from sae_hooks.train.sources import ActivationReader, pack_texts

SITE = "transformer.h.1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tolerance", type=float, default=0.01)
    args = ap.parse_args()
    torch.set_num_threads(2)
    runs = Path(args.runs)
    model, tok = load_default_model()
    _, held = pydoc_texts()
    batches = pack_texts(tok, held, 128, 16, 0)[: args.batches]
    reader = ActivationReader(model, [SITE], bos_token_id=0)
    acts = [reader.read(b)[SITE] for b in batches]

    print(f"MDL on {sum(a.shape[0] for a in acts):,} held-out tokens at {SITE} (d = {acts[0].shape[-1]}); "
          f"precision: coarsest with FVU increase <= {args.tolerance}")
    print("| SAE | d_sae | k | L0 | FVU | precision | B (bits/value) | entropy (bits/token) | bound L0·(B+log2 F) | dense d·B | dense entropy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    names = [f"topk-{w}-k16-s0" for w in (128, 256, 512, 1024)] + [f"topk-512-k{k}-s0" for k in (4, 8, 32)]
    for name in sorted(set(names), key=lambda n: (int(n.split("-")[1]), int(n.split("-k")[1].split("-")[0]))):
        sae = load_native(runs / name).eval()
        with torch.no_grad():
            r = mdl_report(sae, acts, tolerance=args.tolerance)
        print(f"| {name} | {sae.cfg.d_sae} | {sae.cfg.k} | {r['l0']:.1f} | {r['fvu']:.3f} | {r['precision']:.3g} | "
              f"{r['bits_per_value']:.2f} | {r['entropy_bits']:.1f} | {r['bound_bits']:.1f} | {r['dense_bits']:.0f} | "
              f"{r['dense_entropy_bits']:.0f} |", flush=True)

    print("\nCross-seed matching (seeds 0 vs 1, decoder-cosine assignment; shared = decoder and encoder cosine > 0.7)")
    print("| arch | d_sae | L0 (s0) | shared fraction | mean decoder cos | mean encoder cos |")
    print("| --- | --- | --- | --- | --- | --- |")
    x = torch.cat(acts)
    for arch in ("topk", "relu"):
        for w in (128, 256, 512, 1024):
            tag = f"{arch}-{w}-k16" if arch == "topk" else f"{arch}-{w}"
            a, b = load_native(runs / f"{tag}-s0").eval(), load_native(runs / f"{tag}-s1").eval()
            with torch.no_grad():
                l0 = float((a.encode(x) != 0).sum(-1).float().mean())
            s = match_latents(a, b).summary()
            print(f"| {arch} | {w} | {l0:.1f} | {s['shared_fraction']:.3f} | {s['mean_decoder_cos']:.3f} | "
                  f"{s['mean_encoder_cos']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
