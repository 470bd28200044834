#!/usr/bin/env python
"""The benchmark matrix: TopK SAE training and inference, sae-hooks vs sparsify 1.3.3 vs SAELens.

One command, one table (markdown, printed and written to ``--out``):

    python benchmarks/matrix.py                   # the full matrix (hours on 2 CPU cores)
    python benchmarks/matrix.py --quick           # a small subset while developing
    python benchmarks/matrix.py --cells '768/*/32/2048,512/16384/*/*'   # d_model/d_sae/k/tokens, * = any

For every cell (``d_model`` ∈ {512, 768, 2048} × ``d_sae`` ∈ {16384, 32768, 131072} × ``k`` ∈
{32, 128} × tokens per step ∈ {2048, 8192}) each side runs in a fresh process with its own Python
(sparsify in ``--sparsify-python``, SAELens with TransformerLens 3 in ``--saelens-python``: SAELens
cannot be imported next to TransformerLens 4), one side after the other, ``--rounds`` times
(interleaved: ours, sparsify, SAELens, ours, ...). Each process times ``--steps`` training steps after
``--warmup`` (forward, backward, Adam, decoder constraint: each library's own step, no model), then
encode and decode (no grad). Reported: medians over all timed steps of all rounds, tokens/s, the
ratio (their step time / ours: > 1 means we are faster), the same for CPU time (all threads; less
sensitive to other load on a shared machine), peak RSS of the training process. A
side whose estimated peak exceeds ``--mem-limit-gb`` is not run ("did not fit"), and a process
that crosses the limit is killed and reported as such.

The extra sections (``--extras``) run once per invocation: end-to-end in-place training with a
randomly initialised GPT-2-small-shaped model (ours vs sparsify's trainer), the splice overhead
(benchmarks/bench_splice.py), and the data path (live source + shuffle buffer tokens/s, activation
store write vs replay).
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
D_MODEL = (512, 768, 2048)
D_SAE = (16384, 32768, 131072)
KS = (32, 128)
TOKENS = (2048, 8192)
QUICK = ("512/16384/32/2048", "768/32768/32/2048", "768/32768/128/8192", "768/131072/32/2048")
SIDES = ("ours", "sparsify", "saelens")
LABEL = {"ours": "sae-hooks", "before": "sae-hooks (baseline)", "sparsify": "sparsify 1.3.3", "saelens": "SAELens"}


def cell_name(c: tuple[int, int, int, int]) -> str:
    return "/".join(map(str, c))


def select_cells(spec: str | None, quick: bool) -> list[tuple[int, int, int, int]]:
    cells = list(itertools.product(D_MODEL, D_SAE, KS, TOKENS))
    if quick and not spec:
        spec = ",".join(QUICK)
    if not spec:
        return cells
    pats = [p.strip() for p in spec.split(",") if p.strip()]
    for p in pats:
        if len(p.split("/")) != 4:
            sys.exit(f"--cells: {p!r} is not d_model/d_sae/k/tokens (use * for any)")
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(cell_name(c), p) for p in pats)]
    if not chosen:
        sys.exit(f"--cells {spec!r} matches no cell of the matrix")
    return chosen


def estimate_gb(side: str, d: int, L: int, k: int, n: int) -> float:
    """Peak RSS estimate (fp32): parameters + gradients + two Adam moments, the activations each
    implementation keeps, and ~0.5 GB of interpreter and libraries."""
    params = 16 * (2 * d * L)
    if side in ("ours", "before"):
        block = 4 * min(n, max(1, 2**26 // L)) * L * 2 if side == "ours" else 4 * n * L * 2
        act = block + 4 * n * d * 6 + 8 * n * k * 6
        extra = 4 * d * L if side == "ours" else 8 * d * L  # one grad-layout temporary / strided copy
    elif side == "sparsify":
        act = 4 * n * L * 2 + 4 * n * k * d + 4 * n * d * 6  # dense pre-acts + its top-k, (N, k, d) contributions
        extra = 4 * d * L
    else:  # SAELens: dense hidden_pre, feature_acts and their gradients
        act = 4 * n * L * 5 + 4 * n * d * 6
        extra = 4 * d * L
    return (params + act + extra) / 2**30 + 0.5


def run_child(python: str, args: dict, limit_gb: float, env: dict) -> dict:
    """Run one side; kill it if its RSS crosses ``limit_gb``."""
    proc = subprocess.Popen([python, str(HERE / "_sides.py"), json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    killed = {"rss": 0.0}

    def watch() -> None:
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 2**20
            except (OSError, StopIteration):
                break
            if rss > limit_gb:
                killed["rss"] = rss
                proc.kill()
                break
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    if killed["rss"]:
        return {"error": f"over {limit_gb:.0f} GB"}
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (err.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1][7:])


def fmt_s(t: float | None) -> str:
    return "—" if t is None else (f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s")


def median_of(results: list[dict], key: str) -> float | None:
    vals = [v for r in results if "error" not in r for v in r.get(key, [])]
    return statistics.median(vals) if vals else None


def bench_cells(args: argparse.Namespace, cells: list, pythons: dict[str, str], on_cell=None) -> tuple[list[str], dict]:  # noqa: ANN001
    """Run every cell; ``on_cell(rows, raw)`` after each (the table so far, so a long run can be read early)."""
    # PASSIVE: idle OpenMP threads sleep instead of spinning, so CPU time counts work, not waiting
    # (a shared machine makes wall time noisy; the table reports both). Same for every side.
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    raw: dict = {}
    for cell in cells:
        d, L, k, n = cell
        res: dict[str, list[dict]] = {s: [] for s in pythons}
        skipped = {s: estimate_gb(s, d, L, k, n) for s in pythons if estimate_gb(s, d, L, k, n) > args.mem_limit_gb}
        for r in range(args.rounds):
            for side, py in pythons.items():
                if side in skipped:
                    continue
                child = {"side": side, "d_in": d, "d_sae": L, "k": k, "tokens": n, "steps": args.steps,
                         "warmup": args.warmup, "threads": args.threads, "infer": args.infer, "lr": 1e-4,
                         "device": args.device, "bf16": args.bf16}
                child_env = dict(env)
                if side == "before":
                    child_env["PYTHONPATH"] = args.baseline_src
                elif side == "ours" and args.ours_src:
                    child_env["PYTHONPATH"] = args.ours_src
                t0 = time.perf_counter()
                out = run_child(py, child, args.mem_limit_gb, child_env)
                res[side].append(out)
                msg = out.get("error") or f"step {fmt_s(statistics.median(out['train']))} peak {out['peak_gb']:.2f} GB"
                print(f"  [{cell_name(cell)} round {r + 1}] {LABEL[side]:>22}: {msg}  ({time.perf_counter() - t0:.0f}s)",
                      file=sys.stderr, flush=True)
        raw[cell_name(cell)] = {"results": res, "skipped": skipped}
        if on_cell is not None:
            done = [c for c in cells if cell_name(c) in raw]
            on_cell(table(raw, done, pythons, args), raw)
    return table(raw, cells, pythons, args), raw


def table(raw: dict, cells: list, pythons: dict, args: argparse.Namespace) -> list[str]:
    sides = list(pythons)
    others = [s for s in sides if s != "ours"]
    head = ["d_model", "d_sae", "k", "tokens/step"]
    for s in sides:
        head += [f"{LABEL[s]} step", "tok/s"]
    head += [f"× vs {LABEL[s]}" for s in others]
    head += ["CPU s/step " + " / ".join(LABEL[s] for s in sides)] + [f"CPU × vs {LABEL[s]}" for s in others]
    head += ["peak RSS GB " + " / ".join(LABEL[s] for s in sides)]
    head += ["encode tok/s " + " / ".join(LABEL[s] for s in sides), "decode tok/s " + " / ".join(LABEL[s] for s in sides)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        d, L, k, n = cell
        entry = raw[cell_name(cell)]
        res, skipped = entry["results"], entry["skipped"]
        row = [str(d), f"{L:,}", str(k), f"{n:,}"]
        step = {}
        for s in sides:
            if s in skipped:
                row += [f"did not fit (est. {skipped[s]:.1f} GB)", "—"]
                continue
            errs = [r["error"] for r in res[s] if "error" in r]
            step[s] = median_of(res[s], "train")
            if step[s] is None:
                row += [errs[0] if errs else "—", "—"]
            else:
                row += [fmt_s(step[s]), f"{n / step[s]:,.0f}"]
        for s in others:
            row.append(f"{step[s] / step['ours']:.2f}×" if step.get(s) and step.get("ours") else "—")
        cpu = {s: median_of(res.get(s, []), "cpu") for s in sides if s not in skipped}
        row.append(" / ".join(f"{cpu[s]:.2f}" if cpu.get(s) else "—" for s in sides))
        for s in others:
            row.append(f"{cpu[s] / cpu['ours']:.2f}×" if cpu.get(s) and cpu.get("ours") else "—")

        def per_side(key: str, f) -> str:  # noqa: ANN001
            vals = []
            for s in sides:
                ok = [r for r in res.get(s, []) if "error" not in r]
                vals.append(f(ok) if ok else "—")
            return " / ".join(vals)

        row.append(per_side("peak", lambda ok: f"{max(r['peak_gb'] for r in ok):.2f}"))
        row.append(per_side("enc", lambda ok: f"{n / statistics.median([v for r in ok for v in r['encode']]):,.0f}"))
        row.append(per_side("dec", lambda ok: f"{n / statistics.median([v for r in ok for v in r['decode']]):,.0f}"))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def run_script(cmd: list[str], env: dict, timeout: int = 3600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (unless --cells)")
    ap.add_argument("--cells", help="comma-separated d_model/d_sae/k/tokens patterns, * = any")
    ap.add_argument("--sides", default=",".join(SIDES), help="any of ours,sparsify,saelens,before")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per side per cell (interleaved)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--infer", type=int, default=3, help="timed encode/decode repeats per process")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for our step (the others stay fp32)")
    ap.add_argument("--mem-limit-gb", type=float, default=9.0)
    ap.add_argument("--sparsify-python", default=str(ROOT.parent / "perf-sparsify-venv" / "bin" / "python"))
    ap.add_argument("--saelens-python", default=str(ROOT.parent / "perf-saelens-venv" / "bin" / "python"))
    ap.add_argument("--baseline-src", help="folder holding an older sae_hooks package: side 'before' runs it")
    ap.add_argument("--ours-src", help="folder holding the sae_hooks package side 'ours' runs (default: the installed one)")
    ap.add_argument("--extras", default="", help="comma-separated: e2e,splice,data (or 'all')")
    ap.add_argument("--no-matrix", action="store_true", help="only the --extras")
    ap.add_argument("--note", default="", help="a line added under the table (e.g. 'machine shared with 8 engineers')")
    ap.add_argument("--out", default=str(HERE / "results" / "matrix.md"))
    args = ap.parse_args()

    pythons = {}
    for s in [s.strip() for s in args.sides.split(",") if s.strip()]:
        py = {"ours": sys.executable, "before": sys.executable, "sparsify": args.sparsify_python,
              "saelens": args.saelens_python}.get(s)
        if py is None:
            sys.exit(f"--sides: unknown side {s!r}; known: ours, sparsify, saelens, before")
        if s == "before" and not args.baseline_src:
            sys.exit("--sides before needs --baseline-src")
        if not Path(py).exists():
            print(f"{LABEL[s]}: no Python at {py}; side skipped", file=sys.stderr)
            continue
        pythons[s] = py
    if "ours" not in pythons:
        sys.exit("--sides must include ours")

    import torch

    lines = [
        f"# Benchmark matrix ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
        f"`python benchmarks/matrix.py {' '.join(sys.argv[1:])}` — device {args.device}, {args.threads} threads "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
        f"{args.rounds} fresh processes per side and cell, interleaved, {args.steps} timed steps each after "
        f"{args.warmup} warm-up; medians. Step = forward, backward, Adam, decoder constraint (each library's own "
        "step), no model. × = their step time / ours (> 1: sae-hooks faster). Peak RSS of the training process.",
    ]
    if args.note:
        lines += ["", args.note]
    raw: dict = {}
    if not args.no_matrix:
        cells = select_cells(args.cells, args.quick)
        print(f"{len(cells)} cells, sides {', '.join(pythons)}", file=sys.stderr)
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)

        def partial(rows: list[str], raw: dict) -> None:
            out_path.write_text("\n".join([*lines, "", *rows, "", "(partial: still running)"]) + "\n")
            out_path.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")

        rows, raw = bench_cells(args, cells, pythons, on_cell=partial)
        lines += ["", *rows]
        skipped = [f"{c}: {', '.join(f'{LABEL[s]} (est. {g:.1f} GB)' for s, g in v['skipped'].items())}"
                   for c, v in raw.items() if v["skipped"]]
        if skipped:
            lines += ["", f"Not run (estimated peak over {args.mem_limit_gb:.0f} GB): " + "; ".join(skipped) + "."]
    extras = {e.strip() for e in args.extras.split(",") if e.strip()}
    if "all" in extras:
        extras = {"e2e", "splice", "data"}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
    if "e2e" in extras:
        lines += ["", "## End-to-end in-place training (random GPT-2-small-shaped model)", "", "```",
                  run_script([sys.executable, str(HERE / "bench_train.py"), "--gpt2-small", "--device", args.device,
                              "--sparsify-python", args.sparsify_python], env).strip(), "```"]
    if "splice" in extras:
        lines += ["", "## Splice overhead (GPT-2-small shape, 12 layers, TopK 32,768 k 32, 4×128 tokens)", "", "```",
                  run_script([sys.executable, str(HERE / "bench_splice.py"), "--d-model", "768", "--layers", "12",
                              "--batch", "4", "--seq", "128", "--d-sae", "32768", "--k", "32", "--repeats", "15",
                              "--device", args.device], env).strip(), "```"]
    if "data" in extras:
        lines += ["", "## Data path", "", "```",
                  run_script([sys.executable, str(HERE / "bench_data.py"), "--device", args.device], env).strip(), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
