"""Cross-seed shared fraction of adequately trained TopK and ReLU SAE pairs (docs/matching.md).

Every SAE is trained in ONE run on the activations of ``transformer.h.1`` of the embedded model (the
training split of the pydoc corpus, cached once, reshuffled every epoch with a fixed seed), so the
SAEs of a pair see the same data in the same order and differ only in their seed:

* TopK, k = 16, d_sae ∈ ``--widths``, seeds 0 and 1;
* ReLU (L1), d_sae ∈ ``--widths``, λ₁ ∈ ``--relu-l1`` (a grid, so some point of it lands at an L0
  comparable to TopK's 16 at every width), seeds 0 and 1.

Convergence is logged: every ``--log-every`` steps the held-out FVU / L0 / dead fraction of every SAE
goes to ``<out>/curve.json``; the table reports the held-out FVU at the end and its change over the
last 20 % of the steps, the dead fraction (latents that never fire on the held-out tokens) and the
shared fraction of each pair (matched by decoder cosine; shared = decoder and encoder cosine > 0.7).

    python scripts/train_seed_pairs.py --out runs/seedpairs [--steps 1500 --batch-tokens 1024]
    python scripts/train_seed_pairs.py --out runs/seedpairs --table-only   # re-print the table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sae_hooks import load_native, make_sae
from sae_hooks.app.demo import load_default_model, pydoc_texts
from sae_hooks.eval.matching import match_latents
from sae_hooks.train import Trainer, TrainEntry, TrainSettings
from sae_hooks.train.sources import ActivationReader, pack_texts

SITE = "transformer.h.1"


def activations(split: int) -> torch.Tensor:
    model, tok = load_default_model()
    texts = pydoc_texts()[split]
    reader = ActivationReader(model, [SITE], bos_token_id=0)
    with torch.no_grad():
        return torch.cat([reader.read(b)[SITE] for b in pack_texts(tok, texts, 128, 16, 0)])


def names(widths: list[int], l1s: list[float]) -> list[tuple[str, str, int, float | None]]:
    out: list[tuple[str, str, int, float | None]] = [(f"topk-{w}-k16", "topk", w, None) for w in widths]
    out += [(f"relu-{w}-l1{l1:g}", "relu", w, l1) for w in widths for l1 in l1s]
    return out


def entries(d: int, widths: list[int], l1s: list[float], lr: float, steps: int) -> list[TrainEntry]:
    out = []
    for tag, arch, w, l1 in names(widths, l1s):
        for seed in (0, 1):
            if arch == "topk":
                sae, settings = make_sae("topk", d, w, k=16), TrainSettings(lr=lr, warmup_steps=50, total_steps=steps, seed=seed, dead_tokens=200_000)
            else:
                sae = make_sae("relu", d, w)
                settings = TrainSettings(lr=lr, warmup_steps=50, total_steps=steps, seed=seed, sparsity_warmup_steps=200, dead_tokens=200_000,
                                         arch={"l1_coefficient": l1})
            out.append(TrainEntry(f"{tag}-s{seed}", SITE, sae, settings))
    return out


@torch.no_grad()
def held_out_stats(sae, x: torch.Tensor) -> dict[str, float]:
    f = sae.encode(x)
    x_hat = sae.decode(f)
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    return {"fvu": fvu, "l0": float((f != 0).sum(-1).float().mean()), "dead": float(((f != 0).sum(0) == 0).float().mean())}


def batches(x: torch.Tensor, batch_tokens: int):
    g = torch.Generator().manual_seed(0)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_tokens + 1, batch_tokens):
            yield {SITE: x[perm[i : i + batch_tokens]]}


def table(out: Path, widths: list[int], l1s: list[float], held: torch.Tensor) -> None:
    curve = json.loads((out / "curve.json").read_text()) if (out / "curve.json").exists() else {}
    print("| arch | d_sae | λ₁ | L0 (s0/s1) | FVU (s0/s1) | ΔFVU last 20 % | dead (s0/s1) | shared fraction | mean decoder cos | mean encoder cos | shared (decoder only) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for tag, arch, w, l1 in names(widths, l1s):
        a, b = load_native(out / f"{tag}-s0").eval(), load_native(out / f"{tag}-s1").eval()
        sa, sb = held_out_stats(a, held), held_out_stats(b, held)
        delta = ""
        pts = curve.get(f"{tag}-s0", [])
        if len(pts) >= 5:
            ref = pts[int(0.8 * (len(pts) - 1))]
            delta = f"{pts[-1]['fvu'] - ref['fvu']:+.4f}"
        m = match_latents(a, b)
        s = m.summary()
        dec_only = float((m.decoder_cos > 0.7).float().mean())
        print(f"| {arch} | {w} | {'' if l1 is None else f'{l1:g}'} | {sa['l0']:.1f}/{sb['l0']:.1f} | {sa['fvu']:.3f}/{sb['fvu']:.3f} | "
              f"{delta} | {sa['dead']:.3f}/{sb['dead']:.3f} | {s['shared_fraction']:.3f} | {s['mean_decoder_cos']:.3f} | "
              f"{s['mean_encoder_cos']:.3f} | {dec_only:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--relu-l1", type=float, nargs="+", default=[1.5, 3.0])
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--log-every", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    held = activations(1)
    if not args.table_only:
        x = activations(0)
        print(f"{len(x):,} training tokens, {len(held):,} held-out tokens at {SITE} (d = {x.shape[1]})", flush=True)
        trainer = Trainer(entries(x.shape[1], args.widths, args.relu_l1, args.lr, args.steps))
        curve: dict[str, list[dict[str, float]]] = {e.name: [] for e in trainer.entries}
        out.mkdir(parents=True, exist_ok=True)
        data, t0 = batches(x, args.batch_tokens), time.perf_counter()
        while trainer.step_count < args.steps:
            trainer.fit(data, max_steps=min(args.steps, trainer.step_count + args.log_every))
            for e in trainer.entries:
                curve[e.name].append({"step": trainer.step_count, **held_out_stats(e.final(), held)})
            trainer.save(out)  # every log point: a run stopped early still leaves a table
            (out / "curve.json").write_text(json.dumps(curve))
            print(f"step {trainer.step_count} ({time.perf_counter() - t0:.0f}s): " + ", ".join(
                f"{n} fvu {c[-1]['fvu']:.3f} l0 {c[-1]['l0']:.1f}" for n, c in curve.items() if n.endswith("-s0")), flush=True)
        print(f"trained {len(trainer.entries)} SAEs on {trainer.tokens_seen:,} tokens in {time.perf_counter() - t0:.0f}s")
    table(out, args.widths, args.relu_l1, held)


if __name__ == "__main__":
    main()
