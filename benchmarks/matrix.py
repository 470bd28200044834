#!/usr/bin/env python
"""The benchmark matrix: TopK SAE training and inference, sae-hooks vs sparsify 1.3.3 vs SAELens.

One command, one table (markdown, printed and written to ``--out``):

    python benchmarks/matrix.py                   # the full matrix (hours on 2 CPU cores)
    python benchmarks/matrix.py --quick           # a small subset while developing
    python benchmarks/matrix.py --cells '768/*/32/2048,512/16384/*/*'   # d_model/d_sae/k/tokens, * = any
    python benchmarks/matrix.py --resume          # continue a run that was cut short
    python benchmarks/matrix.py --table-only      # rebuild the table from the results file

Every finished side process is appended at once as one JSON line to the results file (``--results``,
default ``--out`` with ``.jsonl``), so a run cut short still yields a table (``--table-only``; cells
without a record are "not measured (time)") and ``--resume`` runs only what is missing. Cells run
cheapest first (``--order cost``); ``--one-round-from GMAC`` gives the biggest cells one round;
``--time-cap saelens=600`` leaves a side out of the cells its measured cost predicts over the cap.

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


def run_child(python: str, args: dict, limit_gb: float, env: dict, timeout: float | None = None) -> dict:
    """Run one side; kill it if its RSS crosses ``limit_gb`` or it runs past ``timeout`` seconds."""
    proc = subprocess.Popen([python, str(HERE / "_sides.py"), json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    killed = {"rss": 0.0, "time": False}
    start = time.monotonic()

    def watch() -> None:
        while proc.poll() is None:
            if timeout is not None and time.monotonic() - start > timeout:
                killed["time"] = True
                proc.kill()
                break
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
    if killed["time"]:
        return {"error": f"over the {timeout / 60:.0f} min time cap"}
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (err.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1][7:])


def fmt_s(t: float | None) -> str:
    return "—" if t is None else (f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s")


def median_of(results: list[dict], key: str) -> float | None:
    vals = [v for r in results if "error" not in r for v in r.get(key, [])]
    return statistics.median(vals) if vals else None


def gmac(c: tuple[int, int, int, int]) -> float:
    """The cell's size: multiply-adds of its dense encoder product, in units of 10^9 (d_model·d_sae·tokens)."""
    d, L, _k, n = c
    return d * L * n / 1e9


def order_cells(cells: list, order: str) -> list:
    """``matrix`` (the grid's order) or ``cost`` (cheapest first: size, then k), so a run cut short has
    the most cells."""
    return sorted(cells, key=lambda c: (gmac(c), c[2], c)) if order == "cost" else list(cells)


def read_records(path: Path) -> list[dict]:
    """Every record of a results file (one JSON object per line; a truncated last line is ignored)."""
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return recs


def append_record(path: Path, rec: dict) -> None:
    """One line per finished measurement, flushed at once: a run cut short loses at most the one in flight."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def seconds_per_gmac(records: list[dict], side: str) -> float | None:
    """The median measured step time per GMAC of ``side`` (its cost model, for the time caps)."""
    vals = []
    for r in records:
        if r.get("side") == side and "result" in r and "error" not in r["result"]:
            c = tuple(map(int, r["cell"].split("/")))
            vals += [t / gmac(c) for t in r["result"]["train"]]  # type: ignore[arg-type]
    return statistics.median(vals) if vals else None


def bench_cells(args: argparse.Namespace, cells: list, pythons: dict[str, str], results: Path) -> None:
    """Run every cell not yet in ``results`` (fewer than its rounds recorded per side), appending each
    finished side process as one record."""
    # PASSIVE: idle OpenMP threads sleep instead of spinning, so CPU time counts work, not waiting
    # (a shared machine makes wall time noisy; the table reports both). Same for every side.
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    caps = parse_caps(args.time_cap)
    for cell in cells:
        d, L, k, n = cell
        name = cell_name(cell)
        rounds = 1 if args.one_round_from is not None and gmac(cell) >= args.one_round_from else args.rounds
        records = read_records(results) if args.resume else []
        done = {s: sum(1 for r in records if r.get("cell") == name and r.get("side") == s) for s in pythons}
        for s in pythons:
            est = estimate_gb(s, d, L, k, n)
            if est > args.mem_limit_gb and not done[s]:
                append_record(results, {"cell": name, "side": s, "skipped": "memory", "est_gb": round(est, 2),
                                        "limit_gb": args.mem_limit_gb})
                done[s] = rounds
        for s in caps:
            per = seconds_per_gmac(read_records(results), s)
            if s in pythons and per is not None and not done[s]:
                est_s = per * gmac(cell) * (args.warmup + args.steps + 2 * (args.infer + 1) / 3) + 15
                if est_s > caps[s]:
                    append_record(results, {"cell": name, "side": s, "skipped": "time", "est_s": round(est_s),
                                            "cap_s": caps[s]})
                    done[s] = rounds
        for r in range(rounds):
            for side, py in pythons.items():
                if done[side] > r:
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
                load0 = os.getloadavg()[0]
                out = run_child(py, child, args.mem_limit_gb, child_env, timeout=2 * caps[side] if side in caps else None)
                append_record(results, {"cell": name, "side": side, "round": r + 1, "result": out,
                                        "wall_s": round(time.perf_counter() - t0, 1),
                                        "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
                                        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "settings": {k_: child[k_] for k_ in ("steps", "warmup", "threads", "device", "bf16")}})
                msg = out.get("error") or f"step {fmt_s(statistics.median(out['train']))} peak {out['peak_gb']:.2f} GB"
                print(f"  [{name} round {r + 1}] {LABEL[side]:>22}: {msg}  ({time.perf_counter() - t0:.0f}s)",
                      file=sys.stderr, flush=True)


def parse_caps(spec: str) -> dict[str, float]:
    caps = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        side, _, sec = part.partition("=")
        if side not in LABEL or not sec:
            sys.exit(f"--time-cap: {part!r} is not side=seconds (sides: {', '.join(LABEL)})")
        caps[side] = float(sec)
    return caps


def raw_from_records(records: list[dict], sides: list[str]) -> dict:
    """``{cell: {"results": {side: [result, ...]}, "skipped": {side: reason}}}`` from a results file."""
    raw: dict = {}
    for r in records:
        if "cell" not in r or r.get("side") not in sides:
            continue
        entry = raw.setdefault(r["cell"], {"results": {s: [] for s in sides}, "skipped": {}, "load": []})
        if "skipped" in r:
            entry["skipped"][r["side"]] = (f"did not fit (est. {r['est_gb']:.1f} GB > {r['limit_gb']:.0f})"
                                           if r["skipped"] == "memory" else
                                           f"not run (est. {r['est_s']:.0f} s > {r['cap_s']:.0f} s cap)")
        else:
            entry["results"][r["side"]].append(r["result"])
            entry["load"] += r.get("load", [])
    return raw


def table(raw: dict, cells: list, sides: list[str]) -> list[str]:
    """The markdown table of ``cells``; a cell or side without a record is "not measured (time)"."""
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
        entry = raw.get(cell_name(cell), {"results": {}, "skipped": {}})
        res, skipped = entry["results"], entry["skipped"]
        row = [str(d), f"{L:,}", str(k), f"{n:,}"]
        step = {}
        for s in sides:
            if s in skipped:
                row += [skipped[s], "—"]
                continue
            errs = [r["error"] for r in res.get(s, []) if "error" in r]
            step[s] = median_of(res.get(s, []), "train")
            if step[s] is None:
                row += [errs[0] if errs else "not measured (time)", "—"]
            else:
                row += [fmt_s(step[s]), f"{n / step[s]:,.0f}"]
        for s in others:
            row.append(f"{step[s] / step['ours']:.2f}×" if step.get(s) and step.get("ours") else "—")
        cpu = {s: median_of(res.get(s, []), "cpu") for s in sides if s not in skipped}
        row.append(" / ".join(f"{cpu[s]:.2f}" if cpu.get(s) else "—" for s in sides))
        for s in others:
            row.append(f"{cpu[s] / cpu['ours']:.2f}×" if cpu.get(s) and cpu.get("ours") else "—")

        def per_side(f) -> str:  # noqa: ANN001
            vals = []
            for s in sides:
                ok = [r for r in res.get(s, []) if "error" not in r]
                vals.append(f(ok) if ok else "—")
            return " / ".join(vals)

        row.append(per_side(lambda ok: f"{max(r['peak_gb'] for r in ok):.2f}"))
        row.append(per_side(lambda ok: f"{n / statistics.median([v for r in ok for v in r['encode']]):,.0f}"))
        row.append(per_side(lambda ok: f"{n / statistics.median([v for r in ok for v in r['decode']]):,.0f}"))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def compact_table(raw: dict, cells: list, sides: list[str]) -> list[str]:
    """The README's table: one row per cell, step times, wall and CPU ratios to sparsify, peak RSS."""
    head = ["cell (d_model/d_sae/k/tokens)", *[f"{LABEL[s]} step" for s in sides], "× sparsify (wall / CPU)",
            "peak RSS GB (ours / sparsify)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        entry = raw.get(cell_name(cell), {"results": {}, "skipped": {}})
        res, skipped = entry["results"], entry["skipped"]
        row, step, cpu, peak = [cell_name(cell)], {}, {}, {}
        for s in sides:
            ok = [r for r in res.get(s, []) if "error" not in r]
            step[s], cpu[s] = median_of(ok, "train"), median_of(ok, "cpu")
            peak[s] = max((r["peak_gb"] for r in ok), default=None)
            if s in skipped:
                row.append(skipped[s])
            elif step[s] is None:
                errs = [r["error"] for r in res.get(s, []) if "error" in r]
                row.append(errs[0] if errs else "not measured (time)")
            else:
                row.append(fmt_s(step[s]))
        if step.get("ours") and step.get("sparsify"):
            row.append(f"{step['sparsify'] / step['ours']:.2f}× / {cpu['sparsify'] / cpu['ours']:.2f}×")
        else:
            row.append("—")
        row.append(" / ".join("—" if peak.get(s) is None else f"{peak[s]:.2f}" for s in ("ours", "sparsify")))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def summary(raw: dict, records: list[dict], cells: list, sides: list[str]) -> list[str]:
    """Counts, rounds and the load average over the recorded runs (1-minute, at start and end of each)."""
    names = [cell_name(c) for c in cells]
    measured = [c for c in names if c in raw and any(raw[c]["results"].get(s) for s in sides)]
    loads = [v for c in measured for v in raw[c].get("load", [])]
    rounds = {}
    for r in records:
        if r.get("cell") in names and "result" in r:
            rounds.setdefault((r["cell"], r["side"]), 0)
            rounds[(r["cell"], r["side"])] += 1
    out = [f"{len(measured)} of {len(names)} cells measured; {len(names) - len(measured)} not measured (time)."]
    if rounds:
        out[0] += f" Fresh processes per side and cell: {min(rounds.values())}-{max(rounds.values())}."
    if loads:
        out.append(f"Load average (1 min) during the runs: min {min(loads):.1f}, median {statistics.median(loads):.1f}, "
                   f"max {max(loads):.1f} (2 cores).")
    whens = sorted(r["when"] for r in records if r.get("cell") in names and "when" in r)
    if whens:
        out[-1] += f" Measured {whens[0]} to {whens[-1]}."
    return out


EXTRA_TITLES = {
    "e2e": "End-to-end in-place training (random GPT-2-small-shaped model, interleaved)",
    "splice": "Splice overhead (GPT-2-small shape, 12 layers, TopK 32,768 k 32, 4×128 tokens)",
    "data": "Data path",
}


def extra_command(kind: str, args: argparse.Namespace) -> list[str]:
    if kind == "e2e":
        return [sys.executable, str(HERE / "bench_train.py"), "--gpt2-small", "--device", args.device,
                "--sparsify-python", args.sparsify_python, "--rounds", str(args.rounds)]
    if kind == "splice":
        return [sys.executable, str(HERE / "bench_splice.py"), "--d-model", "768", "--layers", "12", "--batch", "4",
                "--seq", "128", "--d-sae", "32768", "--k", "32", "--repeats", "15", "--device", args.device]
    return [sys.executable, str(HERE / "bench_data.py"), "--device", args.device]


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
    ap.add_argument("--results", help="JSONL file each finished measurement is appended to (default: --out with .jsonl)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the results file and run only what it lacks (default: start it anew, the old one kept aside)")
    ap.add_argument("--table-only", action="store_true", help="run nothing: build the table from the results file")
    ap.add_argument("--compact", action="store_true", help="the short table (the README's): step times, ratios, peak RSS")
    ap.add_argument("--order", choices=("cost", "matrix"), default="cost",
                    help="cost: cheapest cells first (d_model·d_sae·tokens, then k), so a run cut short has the most cells")
    ap.add_argument("--one-round-from", type=float, metavar="GMAC",
                    help="cells of at least this many 10^9 encoder multiply-adds get one round instead of --rounds")
    ap.add_argument("--time-cap", default="", metavar="SIDE=S,...",
                    help="e.g. saelens=600: skip a side where its measured cost so far predicts a process over S "
                         "seconds (reported as not run), kill one that runs past 2S")
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

    if args.table_only:  # describe the runs the records come from, not this invocation
        st = [r["settings"] for r in read_records(Path(args.results) if args.results else Path(args.out).with_suffix(".jsonl"))
              if "settings" in r]
        desc = ", ".join(f"{k} {'/'.join(sorted({str(x[k]) for x in st}))}" for k in ("threads", "warmup", "steps") if st)
        how = f"`python benchmarks/matrix.py --table-only` over the recorded runs ({desc or 'none'}; timed steps each after warm-up steps)"
    else:
        how = (f"`python benchmarks/matrix.py {' '.join(sys.argv[1:])}` — {args.threads} threads, up to {args.rounds} "
               f"fresh processes per side and cell, {args.steps} timed steps each after {args.warmup} warm-up")
    lines = [
        f"# Benchmark matrix ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
        f"{how}; device {args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}; sides interleaved (ours, sparsify, SAELens, ours, ...), each in its own fresh "
        "process; medians. Step = forward, backward, Adam, decoder constraint (each library's own step), no model. "
        "× = their step time / ours (> 1: sae-hooks faster). Peak RSS of the training process.",
    ]
    if args.note:
        lines += ["", args.note]
    results = Path(args.results) if args.results else Path(args.out).with_suffix(".jsonl")
    cells = order_cells(select_cells(args.cells, args.quick), args.order)
    if not args.no_matrix and not args.table_only:
        if results.exists() and not args.resume:
            results.rename(results.with_suffix(f".{int(time.time())}.jsonl"))  # kept, never overwritten
        print(f"{len(cells)} cells, sides {', '.join(pythons)}; results appended to {results}", file=sys.stderr)
        bench_cells(args, cells, pythons, results)
    records = read_records(results)
    if not args.no_matrix:
        raw = raw_from_records(records, list(pythons))
        rows = (compact_table if args.compact else table)(raw, cells, list(pythons))
        lines += ["", *summary(raw, records, cells, list(pythons)), "", *rows]
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    if "all" in extras:
        extras = list(EXTRA_TITLES)
    for e in extras:
        if e not in EXTRA_TITLES:
            sys.exit(f"--extras: unknown {e!r}; known: {', '.join(EXTRA_TITLES)}, all")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
    if not args.table_only:
        for kind in extras:
            load0 = os.getloadavg()[0]
            output = run_script(extra_command(kind, args), env).strip()
            append_record(results, {"extra": kind, "output": output, "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
                                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        records = read_records(results)
    for kind, title in EXTRA_TITLES.items():
        recs = [r for r in records if r.get("extra") == kind]
        if recs:
            r = recs[-1]
            lines += ["", f"## {title}", "", f"{r['when']}, load average {r['load'][0]:.1f} at start, {r['load'][1]:.1f} at end.",
                      "", "```", r["output"], "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out} (records: {results})", file=sys.stderr)


if __name__ == "__main__":
    main()
