"""Train the small SAEs the analysis reproductions use (docs/mdl.md, docs/matching.md,
docs/sparse_inference.md), all in place on the embedded model in ONE training run (one forward pass
feeds every SAE):

* TopK, d_sae ∈ {128, 256, 512, 1024}, k = 16, seeds 0 and 1 (MDL widths; cross-seed pairs);
* TopK, d_sae = 512, k ∈ {4, 8, 32}, seed 0 (MDL sparsity);
* ReLU (L1), d_sae ∈ {128, 256, 512, 1024}, seeds 0 and 1 (cross-seed pairs, ReLU vs TopK).

    python scripts/train_analysis_saes.py --out runs/analysis [--steps 300 --batch-tokens 1024]

Writes one native SAE folder per entry (``{arch}-{d_sae}-k{k}-s{seed}``) under ``--out``.
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_hooks import make_sae
from sae_hooks.app.demo import load_default_model, pydoc_texts
from sae_hooks.train import LiveSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings
from sae_hooks.train.sources import pack_texts

SITE = "transformer.h.1"


def entries(d_model: int, relu_l1: float) -> list[TrainEntry]:
    out = []
    for d_sae in (128, 256, 512, 1024):
        for seed in (0, 1):
            out.append(TrainEntry(f"topk-{d_sae}-k16-s{seed}", SITE, make_sae("topk", d_model, d_sae, k=16),
                                  TrainSettings(lr=4e-3, warmup_steps=20, seed=seed, dead_tokens=100_000)))
            out.append(TrainEntry(f"relu-{d_sae}-s{seed}", SITE, make_sae("relu", d_model, d_sae),
                                  TrainSettings(lr=4e-3, warmup_steps=20, seed=seed, sparsity_warmup_steps=50,
                                                arch={"l1_coefficient": relu_l1})))
    for k in (4, 8, 32):
        out.append(TrainEntry(f"topk-512-k{k}-s0", SITE, make_sae("topk", d_model, 512, k=k),
                              TrainSettings(lr=4e-3, warmup_steps=20, seed=0, dead_tokens=100_000)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--relu-l1", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_default_model()
    bos = tok.bos_token_id if tok.bos_token_id is not None else 0
    train_texts, _ = pydoc_texts()
    batches = pack_texts(tok, train_texts, 128, 16, bos)

    def cycle():
        while True:
            yield from batches

    source = LiveSource(model, [SITE], cycle, bos_token_id=bos)
    buffer = ShuffleBuffer(source, batch_tokens=args.batch_tokens, size_tokens=16 * args.batch_tokens, seed=0)
    trainer = Trainer(entries(model.config.n_embd, args.relu_l1))
    t0 = time.perf_counter()
    trainer.fit(buffer, max_steps=args.steps, progress=True)
    paths = trainer.save(args.out)
    print(f"trained {len(paths)} SAEs on {trainer.tokens_seen:,} tokens in {time.perf_counter() - t0:.0f}s -> {args.out}")
    for e in trainer.entries:
        print(e.name, {k: round(v, 4) for k, v in e.state.metrics.items() if k in ("fvu", "l0", "dead_fraction")})


if __name__ == "__main__":
    main()
