"""Time and peak memory of cross-seed latent matching (``sae_hooks.eval.matching``) at large widths.

Each (size, kind) runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) is its own;
the baseline of a subprocess that imports the same modules and builds the two dictionaries is reported too,
so ``matching peak = peak − baseline``. Kinds:

* ``random``: two independent Gaussian dictionaries (the hardest case: no structure, many near-ties);
* ``trained``: trained-like: anisotropic rows (a rank-64 component plus noise), and B holds noisy
  copies of a permutation of 70 % of A's rows plus 30 % fresh rows (a shared fraction ≈ 0.7).

    python benchmarks/bench_matching.py --sizes 16384 32768 131072 --d 768 --kinds random trained
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def dictionaries(F: int, d: int, kind: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(F, d, generator=g), torch.randn(F, d, generator=g)
    basis = torch.randn(64, d, generator=g)
    A = torch.randn(F, 64, generator=g) @ basis / 8 + torch.randn(F, d, generator=g)
    n_shared = int(0.7 * F)
    perm = torch.randperm(F, generator=g)
    fresh = torch.randn(F - n_shared, 64, generator=g) @ basis / 8 + torch.randn(F - n_shared, d, generator=g)
    B = torch.cat([A[perm[:n_shared]] + 0.5 * torch.randn(n_shared, d, generator=g), fresh])
    return A, B[torch.randperm(F, generator=g)]


def child(F: int, d: int, kind: str, candidates: int, threads: int, baseline: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    A, B = dictionaries(F, d, kind)
    out = {"latents": F, "d": d, "kind": kind, "candidates": candidates, "threads": threads}
    # the baseline imports what the matching imports, so the difference is its working memory
    import scipy.optimize  # noqa: F401
    import scipy.sparse.csgraph  # noqa: F401

    import sae_hooks.eval.matching  # noqa: F401

    if not baseline:
        from sae_hooks.eval import matching
        from sae_hooks.eval.matching import _unit, assign, edge_sims

        search = matching.top_candidates
        spent = []

        def timed_search(*a, **k):  # the candidate search's share of the total
            t = time.perf_counter()
            try:
                return search(*a, **k)
            finally:
                spent.append(time.perf_counter() - t)

        matching.top_candidates = timed_search
        load0 = os.getloadavg()[0]
        t0, cpu0 = time.perf_counter(), time.process_time()
        r, c = assign(A, B, candidates=candidates)
        out["total_s"] = time.perf_counter() - t0
        out["cpu_s"] = time.process_time() - cpu0  # all threads; robust to other jobs' load
        out["load_avg"] = (load0 + os.getloadavg()[0]) / 2  # 1-minute load average, start and end
        out["candidate_search_s"] = sum(spent)
        out["searches"] = len(spent)
        cos = torch.as_tensor(edge_sims(_unit(A), _unit(B), r, c))
        out["pairs"] = len(r)
        out["mean_cos"] = float(cos.mean())
        out["shared_at_0.7"] = float((cos > 0.7).float().mean())
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768, 131072])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--kinds", nargs="+", default=["random", "trained"])
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(**spec)))
        return
    rows = []
    for F in args.sizes:
        for kind in args.kinds:
            res = {}
            for baseline in (True, False):
                spec = dict(F=F, d=args.d, kind=kind, candidates=args.candidates, threads=args.threads, baseline=baseline)
                p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
                if p.returncode:
                    raise SystemExit(p.stderr[-3000:])
                res[baseline] = json.loads(p.stdout.strip().splitlines()[-1])
            row = {**res[False], "baseline_rss_mb": res[True]["peak_rss_mb"]}
            row["matching_peak_mb"] = row["peak_rss_mb"] - row["baseline_rss_mb"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| latents | d | kind | threads | load avg | candidate search (s) | total wall (s) | total CPU (s) | matching peak (MB) | process peak (MB) | mean cos | shared @0.7 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['latents']:,} | {r['d']} | {r['kind']} | {r['threads']} | {r['load_avg']:.1f} | {r['candidate_search_s']:.1f} | "
              f"{r['total_s']:.1f} | {r['cpu_s']:.1f} | {r['matching_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['mean_cos']:.3f} | "
              f"{r['shared_at_0.7']:.3f} |")


if __name__ == "__main__":
    main()
