#!/usr/bin/env python
"""One architecture's training step (forward, backward, Adam, its post-step hook; no model), this
checkout against an older one: each side in its own fresh process, interleaved, medians.

    python benchmarks/bench_arch_step.py --arch matryoshka --widths 2048,8192 \
        --baseline-src ../old-checkout [--d-in 768 --d-sae 32768 --k 32 --tokens 2048]

``--baseline-src`` is a folder holding an older ``sae_hooks`` package (e.g. a ``git worktree`` at an
earlier commit). Reports step time, tokens/s and peak RSS per side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _sides  # the matrix's input batches and peak RSS (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def child(a: dict) -> None:
    import torch

    import sae_hooks
    from sae_hooks import make_sae
    from sae_hooks.train import TrainEntry, TrainSettings

    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    extra = {"matryoshka_widths": a["widths"]} if a["widths"] else {}
    sae = make_sae(a["arch"], a["d_in"], a["d_sae"], k=a["k"], **extra)
    entry = TrainEntry("sae", "x", sae, TrainSettings(lr=1e-4, warmup_steps=10, init_batches=1))
    xs = _sides.batches(a, torch)  # the matrix's inputs
    times = []
    for i in range(a["warmup"] + a["steps"]):
        t = time.perf_counter()
        entry.train_step(xs[i % 2])
        if i >= a["warmup"]:
            times.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({"train": times, "peak_gb": _sides.peak_gb(), "package": sae_hooks.__file__}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="matryoshka")
    ap.add_argument("--widths", default="", help="matryoshka_widths, comma-separated (Matryoshka only)")
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--baseline-src", required=True, help="folder holding the older sae_hooks package")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    cfg = {"arch": args.arch, "widths": [int(w) for w in args.widths.split(",") if w], "d_in": args.d_in,
           "d_sae": args.d_sae, "k": args.k, "tokens": args.tokens, "steps": args.steps, "warmup": args.warmup,
           "threads": args.threads}
    baseline = Path(args.baseline_src).resolve()
    if not (baseline / "sae_hooks" / "__init__.py").is_file():
        sys.exit(f"--baseline-src {args.baseline_src}: no sae_hooks package in that folder")
    sides = {"this checkout": str(ROOT), "baseline": str(baseline)}
    results: dict[str, list] = {s: [] for s in sides}
    peaks: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    for _ in range(args.rounds):
        for side, src in sides.items():
            out = subprocess.run([sys.executable, __file__, "--baseline-src", src, "--child", json.dumps(cfg)],
                                 capture_output=True, text=True, env={**env, "PYTHONPATH": src}, cwd=src)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                sys.exit(f"{side} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            r = json.loads(line[0][7:])
            if not Path(r["package"]).resolve().is_relative_to(Path(src)):
                sys.exit(f"{side}: imported {r['package']}, not the package under {src}")
            results[side] += r["train"]
            peaks[side] = max(peaks.get(side, 0.0), r["peak_gb"])
    print(f"{args.arch} {args.d_in}/{args.d_sae}/k{args.k}/{args.tokens} tokens, widths {cfg['widths']}, "
          f"{args.threads} threads, {args.rounds} rounds interleaved × {args.steps} steps")
    med = {s: statistics.median(v) for s, v in results.items()}
    for s in sides:
        print(f"{s:>14}: step {med[s]:.3f} s  {args.tokens / med[s]:8,.0f} tok/s  peak RSS {peaks[s]:.2f} GB")
    print(f"speed-up (baseline / this checkout): {med['baseline'] / med['this checkout']:.2f}x")


if __name__ == "__main__":
    main()
