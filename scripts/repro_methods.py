"""Reproduction tables of issue 11 (PAM-SGD, Feature/Mutual Choice, Matryoshka), small enough for a laptop CPU.

    .venv/bin/python scripts/repro_methods.py pam-digits    # PAM-SGD vs Adam on sklearn's 8x8 digits
    .venv/bin/python scripts/repro_methods.py pam-embedded  # the same on embedded-model activations
    .venv/bin/python scripts/repro_methods.py choice        # TopK vs Feature/Mutual Choice, embedded model
    .venv/bin/python scripts/repro_methods.py matryoshka    # prefix FVU, Matryoshka vs BatchTopK
    .venv/bin/python scripts/repro_methods.py all --out docs/methods_results.json

Each prints a Markdown table (pasted into docs/methods.md) and, with --out, merges its numbers into a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from sae_hooks import make_sae
from sae_hooks.train import Trainer, TrainEntry, TrainSettings
from sae_hooks.saes.matryoshka import prefix_fvu
from sae_hooks.train.pam import PAMSettings, pam_fit

FRACTIONS = (0.01, 0.05, 0.10, 0.25, 1.0)
#: adam: our untied SAE, every parameter by Adam; adam-tied: the paper's SGD baseline (decoder = encoderᵀ);
#: pam-sgd: the paper's PAM-SGD (ridge r = 1e-5); pam-sgd-r1: the same with a stronger ridge r = 1.
METHODS = ("adam", "adam-tied", "pam-sgd", "pam-sgd-r1")
SITE = "transformer.h.1"  # residual stream after block 1 of the embedded model (d_model 128)


# Data -----------------------------------------------------------------------------------------------


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits (1797 x 64), scaled to [0, 1] then standardised with one global mean/std (as the
    paper normalises MNIST), split 80/20."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    x = (x - x.mean()) / x.std()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * x.shape[0])
    return x[perm[:n_train]], x[perm[n_train:]]


def embedded_model():  # noqa: ANN201
    from sae_hooks.app.demo import load_default_model, pydoc_texts

    model, tok = load_default_model()
    train_texts, held_texts = pydoc_texts()
    return model, tok, train_texts, held_texts


def embedded_activations(max_tokens: int, texts: list[str], model, tok, seq_len: int = 128) -> torch.Tensor:  # noqa: ANN001
    from sae_hooks.train.sources import ActivationReader, pack_texts

    bos = tok.bos_token_id if tok.bos_token_id is not None else 0
    reader = ActivationReader(model, [SITE], bos_token_id=bos)
    out, n = [], 0
    for batch in pack_texts(tok, texts, seq_len, 16, bos):
        acts = reader.read(batch)[SITE]
        out.append(acts)
        n += acts.shape[0]
        if n >= max_tokens:
            break
    return torch.cat(out)[:max_tokens]


# PAM-SGD vs Adam -------------------------------------------------------------------------------------


def _paper_init(sae, seed: int, enc_scale: float, dec_scale: float) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) * enc_scale)
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=g) * dec_scale)
        sae.b_enc.zero_()
        sae.b_dec.zero_()


def _objective(l1: float, tied: bool = False):  # noqa: ANN202
    """The paper's loss: per-element MSE (nn.MSELoss) plus, for ReLU, l1 · mean_batch Σ|z|. ``tied``: the paper's
    SGD baseline decodes with the encoder transposed (``x_hat = z W_encᵀ + b_dec``)."""

    def loss(sae, x):  # noqa: ANN001, ANN202
        latents, _ = sae.encode_with_state(x)
        if tied:
            with torch.no_grad():
                sae.W_dec.copy_(sae.W_enc.T)  # so that sae(x) at test time is the tied model
            z = latents.to_dense() if hasattr(latents, "to_dense") else latents
            x_hat = z @ sae.W_enc.T + sae.b_dec
        else:
            x_hat = sae.decode(latents)
        out = (x_hat - x).pow(2).mean()
        if l1:
            out = out + l1 * sae.encode(x).abs().sum(-1).mean()
        return out

    return loss


def _adam_fit(sae, x, loss_fn, epochs, batch_size, lr, seed, params=None):  # noqa: ANN001, ANN202
    opt = torch.optim.Adam(params if params is not None else sae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for a in range(0, x.shape[0], batch_size):
            loss = loss_fn(sae, x[perm[a:a + batch_size]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return sae


@torch.no_grad()
def _test_metrics(sae, x) -> dict[str, float]:  # noqa: ANN001
    f = sae.encode(x)
    x_hat = sae(x)
    return {"mse": (x_hat - x).pow(2).mean().item(), "l0": (f != 0).sum(-1).float().mean().item(),
            "fvu": ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()}


def pam_vs_adam(train: torch.Tensor, test: torch.Tensor, *, arch: str, d_sae: int, k: int | None, l1: float,
                epochs: int, batch_size: int, lr: float, seeds: int, enc_scale: float, dec_scale: float,
                decoder_batch: int) -> list[dict]:
    rows = []
    for frac in FRACTIONS:
        n = max(2, int(round(frac * train.shape[0])))
        for method in METHODS:
            runs = []
            for seed in range(seeds):
                sub = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(100 + seed))[:n]]
                extra = {"k": k} if k else {}
                sae = make_sae(arch, train.shape[1], d_sae, **extra)
                _paper_init(sae, seed, enc_scale, dec_scale)
                t0 = time.perf_counter()
                if method.startswith("adam"):
                    tied = method == "adam-tied"
                    params = [p for n_, p in sae.named_parameters() if not (tied and n_ == "W_dec")]
                    _adam_fit(sae, sub, _objective(l1, tied), epochs, batch_size, lr, seed, params)
                    if tied:
                        with torch.no_grad():
                            sae.W_dec.copy_(sae.W_enc.T)
                else:
                    r = 1.0 if method == "pam-sgd-r1" else 1e-5
                    pam_fit(sae, sub, _objective(l1), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                            settings=PAMSettings(decoder_reg=r), decoder_batch=decoder_batch)
                m = _test_metrics(sae, test)
                m["seconds"] = time.perf_counter() - t0
                runs.append(m)
            row = {"fraction": frac, "n_train": n, "method": method}
            for key in ("mse", "l0", "fvu", "seconds"):
                vals = [r[key] for r in runs]
                row[key] = statistics.mean(vals)
                row[key + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            rows.append(row)
            print(f"  {arch} frac {frac:>5}: {method:8s} test MSE {row['mse']:.4f} ± {row['mse_std']:.4f}  L0 {row['l0']:.1f}",
                  flush=True)
    return rows


def pam_table(rows: list[dict], title: str) -> str:
    head = " | ".join(f"{m} test MSE" for m in METHODS) + " | " + " | ".join(f"{m} L0" for m in METHODS)
    lines = [f"**{title}**", "", f"| train fraction | samples | {head} |", "|---|---|" + "---|" * (2 * len(METHODS))]
    by = {(r["fraction"], r["method"]): r for r in rows}
    for frac in FRACTIONS:
        rs = [by[(frac, m)] for m in METHODS]
        mse = " | ".join(f"{r['mse']:.4f} ± {r['mse_std']:.4f}" for r in rs)
        l0 = " | ".join(f"{r['l0']:.1f}" for r in rs)
        lines.append(f"| {frac:.0%} | {rs[0]['n_train']} | {mse} | {l0} |")
    return "\n".join(lines)


def cmd_pam_digits(args) -> dict:  # noqa: ANN001
    train, test = digits()
    out = {}
    for arch, k, l1 in (("signed_topk", 8, 0.0), ("relu", None, 1e-3)):
        rows = pam_vs_adam(train, test, arch=arch, d_sae=128, k=k, l1=l1, epochs=args.epochs or 30, batch_size=32,
                           lr=3e-3, seeds=args.seeds, enc_scale=0.1, dec_scale=0.01, decoder_batch=1024)
        out[arch] = rows
        print(pam_table(rows, f"digits 8x8, {arch}" + (f" k={k}" if k else f" L1={l1}")))
    return {"pam_digits": out}


def cmd_pam_embedded(args) -> dict:  # noqa: ANN001
    model, tok, train_texts, held_texts = embedded_model()
    train = embedded_activations(args.tokens, train_texts, model, tok)
    test = embedded_activations(args.tokens // 4, held_texts, model, tok)
    mu, sd = train.mean(0), train.std(0) + 1e-8  # per-dimension z-score, as the paper's LLM script
    train, test = (train - mu) / sd, (test - mu) / sd
    print(f"embedded model {SITE}: {train.shape[0]} train / {test.shape[0]} test tokens, d={train.shape[1]}")
    d = train.shape[1]
    rows = pam_vs_adam(train, test, arch="signed_topk", d_sae=4 * d, k=16, l1=0.0, epochs=args.epochs or 10,
                       batch_size=256, lr=1e-3, seeds=args.seeds, enc_scale=1 / math.sqrt(d),
                       dec_scale=1 / math.sqrt(4 * d), decoder_batch=2048)
    print(pam_table(rows, f"embedded model {SITE}, signed TopK k=16, d_sae={4 * d}"))
    return {"pam_embedded": rows}


# Feature / Mutual Choice vs TopK, and Matryoshka --------------------------------------------------


def _train_entries(entries: list[TrainEntry], acts: torch.Tensor, steps: int, batch: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            perm = torch.randperm(acts.shape[0], generator=g)
            for a in range(0, acts.shape[0] - batch + 1, batch):
                yield acts[perm[a:a + batch]]

    Trainer(entries).fit(batches(), max_steps=steps)


@torch.no_grad()
def _choice_eval(sae, model, tok, held_texts, test_acts) -> dict[str, float]:  # noqa: ANN001
    try:  # sae_hooks.eval (issue 9) replaces sae_hooks.metrics
        from sae_hooks.eval import hooks_splice_runner, splice_metrics
    except ImportError:
        from sae_hooks.metrics import hooks_splice_runner, splice_metrics
    from sae_hooks.train.sources import pack_texts

    f = sae.encode(test_acts)
    per_token = (f != 0).sum(-1).float()
    x_hat = sae(test_acts)
    fvu = ((x_hat - test_acts).pow(2).sum() / (test_acts - test_acts.mean(0)).pow(2).sum()).item()
    bos = tok.bos_token_id if tok.bos_token_id is not None else 0
    batches = pack_texts(tok, held_texts, 128, 16, bos)[:4]
    splice = splice_metrics(hooks_splice_runner(model, SITE, bos_token_id=bos), sae, batches)
    q = torch.quantile(per_token, torch.tensor([0.1, 0.5, 0.9]))
    return {
        "l0": per_token.mean().item(), "l0_std": per_token.std().item(), "l0_p10": q[0].item(), "l0_p50": q[1].item(),
        "l0_p90": q[2].item(), "l0_max": per_token.max().item(),
        "dead_fraction": ((f != 0).sum(0) == 0).float().mean().item(), "fvu": fvu,
        "ce_loss_recovered": splice.get("ce_loss_score", splice.get("ce_loss_recovered")),
    }


CHOICE_CASES = {  # name -> (architecture, arch settings)
    "topk (AuxK)": ("topk", {}),
    "mutual_choice (aux_zipf)": ("mutual_choice", {}),
    "feature_choice uniform (aux_zipf)": ("feature_choice", {}),
    "feature_choice zipf (aux_zipf)": ("feature_choice", {"capacities": "zipf"}),
}
#: --ablation: the auxiliary loss of the choice SAEs (ours, aux_zipf) against OpenAI's AuxK and none
CHOICE_ABLATION = {
    "mutual_choice (AuxK)": ("mutual_choice", {"aux": "k"}),
    "mutual_choice (no aux loss)": ("mutual_choice", {"aux_coefficient": 0.0}),
    "feature_choice uniform (no aux loss)": ("feature_choice", {"aux_coefficient": 0.0}),
}
#: the metrics averaged over seeds (and interpolated in L0 where a budget could not be matched directly)
CHOICE_KEYS = ("l0", "l0_std", "l0_p10", "l0_p50", "l0_p90", "l0_max", "dead_fraction", "train_dead_fraction", "fvu",
               "ce_loss_recovered", "budget")


def _choice_run(arch: str, extra: dict, budget: float | None, acts, test, d_sae: int, k: int, steps: int, batch: int,
                seed: int):  # noqa: ANN001, ANN202
    torch.manual_seed(seed)
    sae = make_sae(arch, acts.shape[1], d_sae, k=k)
    arch_settings = dict(extra, **({"budget": budget} if budget is not None else {}))
    e = TrainEntry(arch, "x", sae, TrainSettings(lr=2e-3, dead_tokens=20_000, arch=arch_settings))
    _train_entries([e], acts, steps, batch, seed=seed)
    final = e.final_sae()
    with torch.no_grad():
        l0 = (final.encode(test) != 0).sum(-1).float().mean().item()
    return final, e.dead.float().mean().item(), l0


def _interpolate(a: dict, b: dict, target: float) -> dict:
    t = (target - a["l0"]) / (b["l0"] - a["l0"])
    return {key: a[key] + t * (b[key] - a[key]) for key in CHOICE_KEYS}


def cmd_choice(args) -> dict:  # noqa: ANN001
    """TopK vs Feature/Mutual Choice at matched mean L0 (held out), ``--seeds`` seeds each.

    TopK's L0 is exactly ``k``. A choice SAE's L0 at inference comes from its learned thresholds, so its training
    budget (average matches per token) is tuned per seed (budget scaled by k / L0, then regula falsi once a
    pair of runs brackets k) on the held-out mean L0 until it is within
    ``--l0-tol`` of ``k`` (at most 5 trainings); if no run lands inside, the metrics are interpolated linearly in L0
    between the two runs that bracket ``k`` (the table says how many seeds needed it). The first run of every choice
    SAE uses budget = ``k``: those runs give the second table (same budget, unmatched L0)."""
    model, tok, train_texts, held_texts = embedded_model()
    acts = embedded_activations(args.tokens, train_texts, model, tok)
    test = embedded_activations(8192, held_texts, model, tok)
    d, k, batch = acts.shape[1], 16, args.batch
    d_sae = args.expansion * d
    print(f"choice: {acts.shape[0]} training / {test.shape[0]} held-out tokens at {SITE}, d_sae={d_sae}, k={k}, "
          f"batch {batch}, {args.steps} steps, {args.seeds} seeds", flush=True)
    t0 = time.perf_counter()
    cases = CHOICE_ABLATION if args.ablation else CHOICE_CASES
    matched: dict[str, list[dict]] = {name: [] for name in cases}
    same_budget: dict[str, list[dict]] = {name: [] for name in cases}
    for seed in range(args.seeds):
        for name, (arch, extra) in cases.items():
            tries: list[tuple[object, float, float, float]] = []  # (sae, train dead, l0, budget)
            budget = float(k)
            for _ in range(1 if arch == "topk" else 5):
                sae, tdead, l0 = _choice_run(arch, extra, None if arch == "topk" else budget, acts, test, d_sae, k,
                                             args.steps, batch, seed)
                tries.append((sae, tdead, l0, budget))
                print(f"  seed {seed} {name}: budget {budget:.3f} -> held-out L0 {l0:.2f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
                if abs(l0 - k) <= args.l0_tol * k:
                    break
                below = [t for t in tries if t[2] < k]
                above = [t for t in tries if t[2] > k]
                if below and above:  # regula falsi inside the closest bracket
                    lo, hi = max(below, key=lambda t: t[2]), min(above, key=lambda t: t[2])
                    budget = lo[3] + (k - lo[2]) * (hi[3] - lo[3]) / (hi[2] - lo[2])
                else:  # L0 roughly proportional to the budget: scale the closest run's budget
                    near = min(tries, key=lambda t: abs(t[2] - k))
                    budget = near[3] * k / max(near[2], 1e-3)

            def full(t):  # noqa: ANN001, ANN202
                m = _choice_eval(t[0], model, tok, held_texts, test)
                m.update(train_dead_fraction=t[1], budget=t[3])
                return m

            first = full(tries[0])
            same_budget[name].append(first)
            best = min(tries, key=lambda t: abs(t[2] - k))
            if arch == "topk" or abs(best[2] - k) <= args.l0_tol * k:
                m = first if best is tries[0] else full(best)
                m["interpolated"] = False
            else:
                below = [t for t in tries if t[2] < k]
                above = [t for t in tries if t[2] > k]
                if below and above:
                    lo = max(below, key=lambda t: t[2])
                    hi = min(above, key=lambda t: t[2])
                    m = _interpolate(full(lo), full(hi), float(k))
                    m["interpolated"] = True
                else:
                    m = full(best)
                    m["interpolated"] = False
                    m["unmatched"] = True
            matched[name].append(m)
            print(f"  seed {seed} {name}: {m}", flush=True)
    print(f"  trained in {time.perf_counter() - t0:.0f}s", flush=True)

    def agg(runs: list[dict]) -> dict:
        out = {}
        for key in CHOICE_KEYS:
            vals = [r[key] for r in runs]
            out[key] = statistics.mean(vals)
            out[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out["interpolated_seeds"] = sum(bool(r.get("interpolated")) for r in runs)
        out["unmatched_seeds"] = sum(bool(r.get("unmatched")) for r in runs)
        return out

    def table(rows: dict[str, dict], budget_col: bool) -> str:
        pm = lambda m, key, f: f"{m[key]:{f}} ± {m[key + '_sd']:{f}}"  # noqa: E731
        head = "| SAE | " + ("training budget | " if budget_col else "") + "mean L0 | L0 std (per token) | " \
               "latents per token p10 / p50 / p90 / max | dead (held out) | dead (training) | FVU | CE loss recovered |"
        lines = [head, "|---|" + ("---|" if budget_col else "") + "---|---|---|---|---|---|---|"]
        for name, m in rows.items():
            note = f" ({m['interpolated_seeds']} of {args.seeds} seeds interpolated)" if m["interpolated_seeds"] else ""
            note += f" ({m['unmatched_seeds']} seeds NOT matched)" if m["unmatched_seeds"] else ""
            lines.append(
                f"| {name}{note} | " + (f"{pm(m, 'budget', '.2f')} | " if budget_col else "")
                + f"{pm(m, 'l0', '.2f')} | {m['l0_std']:.1f} | {m['l0_p10']:.1f} / {m['l0_p50']:.1f} / {m['l0_p90']:.1f} / "
                f"{m['l0_max']:.1f} | {m['dead_fraction']:.1%} ± {m['dead_fraction_sd']:.1%} | "
                f"{m['train_dead_fraction']:.1%} ± {m['train_dead_fraction_sd']:.1%} | {pm(m, 'fvu', '.4f')} | "
                f"{pm(m, 'ce_loss_recovered', '.4f')} |")
        return "\n".join(lines)

    matched_rows = {name: agg(runs) for name, runs in matched.items()}
    budget_rows = {name: agg(runs) for name, runs in same_budget.items()}
    print("\nAt matched mean L0:\n" + table(matched_rows, True))
    print("\nAt the same training budget k (unmatched L0):\n" + table(budget_rows, False))
    return {"choice_ablation" if args.ablation else "choice": {"matched_l0": matched_rows, "same_budget": budget_rows,
                       "runs": {name: runs for name, runs in matched.items()},
                       "config": {"tokens": acts.shape[0], "held_out": test.shape[0], "d_sae": d_sae, "k": k,
                                  "batch": batch, "steps": args.steps, "seeds": args.seeds, "l0_tol": args.l0_tol}}}


def cmd_matryoshka(args) -> dict:  # noqa: ANN001
    torch.manual_seed(0)
    model, tok, train_texts, held_texts = embedded_model()
    acts = embedded_activations(args.tokens, train_texts, model, tok)
    test = embedded_activations(8192, held_texts, model, tok)
    d, d_sae, k = acts.shape[1], 8 * acts.shape[1], 16
    widths = [d_sae // 16, d_sae // 4, d_sae]
    m_sae = make_sae("matryoshka", d, d_sae, k=k, matryoshka_widths=widths)
    b_sae = make_sae("matryoshka", d, d_sae, k=k)  # one prefix = a plain BatchTopK SAE, same code path
    entries = [TrainEntry("matryoshka", "x", m_sae, TrainSettings(lr=2e-3)),
               TrainEntry("batchtopk", "x", b_sae, TrainSettings(lr=2e-3))]
    _train_entries(entries, acts, args.steps, 1024)
    out = {}
    lines = ["| SAE | " + " | ".join(f"FVU, first {w} latents" for w in widths) + " |", "|---|" + "---|" * len(widths)]
    for e in entries:
        # the plain SAE has one prefix: evaluate both at the same widths
        fvus = prefix_fvu(e.final(), test, widths)
        out[e.name] = fvus
        lines.append(f"| {e.name} | " + " | ".join(f"{fvus[w]:.3f}" for w in widths) + " |")
    print("\n".join(lines))
    return {"matryoshka": {k: {str(w): v for w, v in d_.items()} for k, d_ in out.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["pam-digits", "pam-embedded", "choice", "matryoshka", "all"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--expansion", type=int, default=8, help="choice: d_sae / d")
    ap.add_argument("--batch", type=int, default=1024, help="choice: tokens per step")
    ap.add_argument("--l0-tol", type=float, default=0.02, help="choice: relative mean-L0 tolerance of the match")
    ap.add_argument("--ablation", action="store_true", help="choice: the auxiliary-loss ablation rows instead")
    ap.add_argument("--out", help="merge the numbers into this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cmds = {"pam-digits": cmd_pam_digits, "pam-embedded": cmd_pam_embedded, "choice": cmd_choice, "matryoshka": cmd_matryoshka}
    results = {}
    for name, fn in cmds.items():
        if args.what in (name, "all"):
            results.update(fn(args))
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(results)
        path.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
