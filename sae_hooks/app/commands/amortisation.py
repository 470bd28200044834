"""``sae-hooks amortisation``: the amortisation gap -- an SAE's encoder against inference-time encoders
with the same decoder, on synthetic data with a known dictionary (``--synthetic``) or an unknown one
(``--unknown-dictionary``), or on a model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._analysis import add_model_args, load_sae, model_batches, sae_site


def cmd_amortisation(args: argparse.Namespace) -> int:
    from ...eval.amortisation import format_table, known_dictionary_experiment, model_table, unknown_dictionary_experiment

    if args.unknown_dictionary:
        runs = [unknown_dictionary_experiment(args.sources, args.dims, args.active, steps=args.steps,
                                              ito_steps=args.ito_steps or 10_000, sklearn=args.sklearn, seed=args.seed + i)
                for i in range(args.runs)]
        rows = {name: {m: sum(r[name][m] for r in runs) / len(runs) for m in runs[0][name]} for name in runs[0]}
        print(f"unknown dictionary: N={args.sources} sources, M={args.dims} dims, K={args.active} active; "
              f"{args.steps} steps; mean of {args.runs} run(s)")
    elif args.synthetic:
        runs = [known_dictionary_experiment(args.sources, args.dims, args.active, steps=args.steps, ito_steps=args.ito_steps or args.steps,
                                            seed=args.seed + i) for i in range(args.runs)]
        rows = {name: {m: sum(r[name][m] for r in runs) / len(runs) for m in runs[0][name]} for name in runs[0]}
        print(f"known dictionary: N={args.sources} sources, M={args.dims} dims, K={args.active} active; "
              f"{args.steps} steps; mean of {args.runs} run(s)")
    else:
        if not args.sae:
            raise SystemExit("sae-hooks amortisation: pass an SAE (or --synthetic)")
        sae = load_sae(args.sae)
        model, _, batches, bos = model_batches(args)
        site = sae_site(model, sae, args.site, "amortisation")
        rows = model_table(model, sae, site, batches, bos_token_id=bos)
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("amortisation", help="amortisation gap: SAE encoder vs ITO / FISTA / OMP / MLP encoders")
    p.add_argument("sae", nargs="?", help="SAE folder/file (any supported format) or Hub repo")
    add_model_args(p, batches=2)
    p.add_argument("--synthetic", action="store_true", help="the paper's known-dictionary experiment instead")
    p.add_argument("--unknown-dictionary", action="store_true",
                   help="the paper's unknown-dictionary experiment: SAE, MLP encoders and sparse coding learn their own dictionary")
    p.add_argument("--sklearn", action="store_true", help="with --unknown-dictionary: add scikit-learn's DictionaryLearning")
    p.add_argument("--ito-steps", type=int, default=None, help="ITO iterations (default: --steps; 10,000 with --unknown-dictionary)")
    p.add_argument("--sources", type=int, default=16)
    p.add_argument("--dims", type=int, default=8)
    p.add_argument("--active", type=int, default=3)
    p.add_argument("--steps", type=int, default=20_000, help="training steps (SAE, MLP) and ITO iterations")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--seed", type=int, default=20240625)
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(fn=cmd_amortisation)
